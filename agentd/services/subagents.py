"""CreateSubAgent, ListSubAgents, DeleteSubAgent (spec §7.14-7.16): a parent agent registers, lists
and removes child agents (dev containers). A child gets its own auth token and authenticates like
any agent; its ``parent_id`` points at the parent.

Authorization is narrower than Coder's owner/org scope: every statement is scoped to children of
*this* agent, so a foreign id updates nothing and is answered "not found" (CreateSubAgent with an
``id`` and DeleteSubAgent alike; deleting an already deleted child is not found too, as in Coder, whose
lookup skips deleted agents).

Validation errors read like Coder's ``codersdk.ValidationError`` (``field: <field> detail: <detail>``).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import re
import uuid
from collections.abc import Mapping

import attrs

from agentd.clock import Now
from agentd.drpc.errors import RpcError
from agentd.drpc.registry import Handler
from agentd.model import AgentIdentity
from agentd.proto import agent_pb2
from agentd.services.base import AGENT, ConnectionScope
from agentd.store import Database
from agentd.store.agents import get_agent_by_id
from agentd.store.errors import StoreError, UniqueViolation
from agentd.store.subagents import (
    AppUpsert,
    NewSubAgent,
    delete_child,
    insert_child,
    list_children,
    reissue_child_token,
    template_max_port_sharing_level,
    update_child_directory,
    update_child_display_apps,
    upsert_app,
)

__all__ = [
    "AGENT_NAME_RE",
    "APP_SLUG_RE",
    "DISPLAY_APPS",
    "OPEN_IN",
    "SHARE_ORDER",
    "SHARING_LEVELS",
    "AppError",
    "SubAgentsService",
    "ValidationError",
    "build",
    "clamp_sharing_level",
    "hashed_slug",
]

log = logging.getLogger("agentd.services.subagents")

Request = agent_pb2.CreateSubAgentRequest
App = Request.App

DISPLAY_APPS = {
    Request.VSCODE: "vscode",
    Request.VSCODE_INSIDERS: "vscode_insiders",
    Request.WEB_TERMINAL: "web_terminal",
    Request.SSH_HELPER: "ssh_helper",
    Request.PORT_FORWARDING_HELPER: "port_forwarding_helper",
}
SHARING_LEVELS = {
    App.OWNER: "owner",
    App.AUTHENTICATED: "authenticated",
    App.PUBLIC: "public",
    App.ORGANIZATION: "organization",
}
OPEN_IN = {App.SLIM_WINDOW: "slim-window", App.TAB: "tab"}

#: Coder's port-share ordering (least to most open): a level is allowed when it does not exceed the
#: template's max_port_sharing_level.
SHARE_ORDER = ("owner", "organization", "authenticated", "public")

AGENT_NAME_RE = re.compile(r"(?i)^[a-z0-9](-?[a-z0-9])*$")
APP_SLUG_RE = re.compile(r"^[a-z0-9](-?[a-z0-9])*$")


class ValidationError(RpcError):
    """A request field is invalid; ``str`` is Coder's ``field: <f> detail: <d>``."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"field: {field} detail: {detail}")
        self.field = field
        self.detail = detail


@attrs.frozen
class AppError(Exception):
    """One app that could not be created: its index, the field at fault (if any) and why."""

    error: str
    field: str | None = None


def hashed_slug(agent_name: str, slug: str) -> str:
    """The stored slug: lower(first 8 chars of base32hex-nopad(sha256("<agent>/<slug>"))) + "-" + slug,
    which keeps app slugs of different dev containers of one workspace apart."""
    digest = hashlib.sha256(f"{agent_name}/{slug}".encode()).digest()
    return base64.b32hexencode(digest).decode("ascii").rstrip("=")[:8].lower() + "-" + slug


def clamp_sharing_level(level: str, max_level: str | None) -> str:
    """The requested level, or the template's maximum when the request exceeds it (None: no policy)."""
    if max_level is None or SHARE_ORDER.index(level) <= SHARE_ORDER.index(max_level):
        return level
    return max_level


def _enum_name(enum: object, value: int) -> str:
    """Go's String() of a proto enum value: its name, or the number when it has none."""
    try:
        return str(enum.Name(value))  # type: ignore[attr-defined]
    except ValueError:
        return str(value)


def _uuid(raw: bytes, field: str, context: str = "") -> uuid.UUID:
    if len(raw) != 16:
        prefix = f"{context}: " if context else ""
        raise RpcError(f"{prefix}invalid UUID (got {len(raw)} bytes) ({field})")
    return uuid.UUID(bytes=bytes(raw))


@attrs.frozen
class SubAgentsService:
    """The sub-agent API of one (parent) agent connection."""

    db: Database
    ident: AgentIdentity
    now: Now

    def handlers(self) -> Mapping[str, Handler]:
        return {
            f"{AGENT}CreateSubAgent": self.create_sub_agent,
            f"{AGENT}ListSubAgents": self.list_sub_agents,
            f"{AGENT}DeleteSubAgent": self.delete_sub_agent,
        }

    async def _parent(self) -> uuid.UUID:
        """AgentFn: the parent's row, read fresh."""
        parent = await get_agent_by_id(self.db, self.ident.agent_id)
        if parent is None or parent.deleted:
            raise RpcError(f'get parent agent: get workspace agent by id "{self.ident.agent_id}": no rows')
        return parent.id

    async def create_sub_agent(
        self, request: agent_pb2.CreateSubAgentRequest
    ) -> agent_pb2.CreateSubAgentResponse:
        now = self.now()
        display_apps: list[str] = []
        for i, value in enumerate(request.display_apps):
            name = DISPLAY_APPS.get(value)
            if name is None:
                raise ValidationError(
                    f"display_apps[{i}]",
                    f'"{_enum_name(Request.DisplayApp, value)}" is not a valid display app',
                )
            display_apps.append(name)
        parent_id = await self._parent()
        if request.HasField("id"):
            return await self._update_existing(request, parent_id, display_apps, now)

        name = request.name
        if not name:
            raise ValidationError("name", "agent name cannot be empty")
        if not AGENT_NAME_RE.match(name):
            raise ValidationError(
                "name", f'agent name "{name}" does not match regex "{AGENT_NAME_RE.pattern}"'
            )
        max_share: str | None = None
        if request.apps:
            max_share = await template_max_port_sharing_level(self.db, self.ident.workspace_id)
            if max_share is None:
                raise RpcError(
                    f"get template policy: workspace {self.ident.workspace_id} or its template not found"
                )
        try:
            child = await insert_child(
                self.db,
                NewSubAgent(
                    id=uuid.uuid4(),
                    parent_id=parent_id,
                    name=name,
                    auth_token=uuid.uuid4(),
                    architecture=request.architecture,
                    operating_system=request.operating_system,
                    directory=request.directory,
                    display_apps=display_apps,
                    created_at=now,
                ),
            )
        except UniqueViolation as exc:
            raise RpcError(f"insert sub agent: {exc} (name)") from exc
        except StoreError as exc:  # e.g. a name or architecture longer than its varchar(64)
            raise RpcError(f"insert sub agent: {exc}") from exc
        if child is None:
            raise RpcError(f'insert sub agent: parent agent "{parent_id}" not found')

        errors: list[agent_pb2.CreateSubAgentResponse.AppCreationError] = []
        seen: set[str] = set()
        for i, app in enumerate(request.apps):
            try:
                await self._create_app(child.id, child.name, app, seen, max_share, now)
            except AppError as exc:
                entry = agent_pb2.CreateSubAgentResponse.AppCreationError(index=i, error=exc.error)
                if exc.field is not None:
                    entry.field = exc.field
                errors.append(entry)
        assert child.auth_token is not None  # just issued
        return agent_pb2.CreateSubAgentResponse(
            agent=agent_pb2.SubAgent(name=child.name, id=child.id.bytes, auth_token=child.auth_token.bytes),
            app_creation_errors=errors,
        )

    async def _update_existing(
        self,
        request: agent_pb2.CreateSubAgentRequest,
        parent_id: uuid.UUID,
        display_apps: list[str],
        now: dt.datetime,
    ) -> agent_pb2.CreateSubAgentResponse:
        """Pre-created child (terraform-defined dev container): refresh display apps and directory.
        Its token is stored hashed, so it cannot be returned: a fresh one is issued (returned once,
        like a new child's; the previous one stops working)."""
        child_id = _uuid(request.id, "id", "parse agent id")
        child = await get_agent_by_id(self.db, child_id)
        if child is None or child.deleted:  # Coder's GetWorkspaceAgentByID skips deleted agents
            raise RpcError(f'get workspace agent by id: agent "{child_id}" not found (id)')
        if child.parent_id != parent_id:
            raise RpcError("subagent does not belong to this parent agent (id)")
        await update_child_display_apps(self.db, parent_id, child_id, display_apps, now)
        if request.directory:
            await update_child_directory(self.db, parent_id, child_id, request.directory, now)
        token = await reissue_child_token(self.db, parent_id, child_id)
        if token is None:
            raise RpcError(f'get workspace agent by id: agent "{child_id}" not found (id)')
        return agent_pb2.CreateSubAgentResponse(
            agent=agent_pb2.SubAgent(name=child.name, id=child.id.bytes, auth_token=token.bytes)
        )

    async def _create_app(
        self,
        agent_id: uuid.UUID,
        agent_name: str,
        app: agent_pb2.CreateSubAgentRequest.App,
        seen: set[str],
        max_share: str | None,
        now: dt.datetime,
    ) -> None:
        """Validate and upsert one app; any failure is an AppError collected by the caller."""
        slug = app.slug
        if not slug:
            raise AppError("must not be empty", "slug")
        if not APP_SLUG_RE.match(slug):
            raise AppError(f'"{slug}" does not match regex "{APP_SLUG_RE.pattern}"', "slug")
        if slug in seen:
            raise AppError(f'"{slug}" is already in use', "slug")
        seen.add(slug)
        healthcheck = app.healthcheck
        health = "initializing" if healthcheck.url else "disabled"
        requested = SHARING_LEVELS.get(app.share)
        if requested is None:
            raise AppError(
                f'"{_enum_name(App.SharingLevel, app.share)}" is not a valid app sharing level', "share"
            )
        sharing_level = clamp_sharing_level(requested, max_share)
        if sharing_level != requested:
            log.warning(
                "sub-agent %s (%s) app %r: sharing level %s clamped to the template's max %s",
                agent_name,
                agent_id,
                slug,
                requested,
                sharing_level,
            )
        open_in = OPEN_IN.get(app.open_in)
        if open_in is None:
            raise AppError(f'"{_enum_name(App.OpenIn, app.open_in)}" is not an open in setting', "open_in")
        row = AppUpsert(
            id=uuid.uuid4(),
            created_at=now,
            agent_id=agent_id,
            slug=hashed_slug(agent_name, slug),
            display_name=app.display_name,
            icon=app.icon,
            command=app.command or None,
            url=app.url or None,
            external=app.external,
            subdomain=app.subdomain,
            sharing_level=sharing_level,
            healthcheck_url=healthcheck.url,
            healthcheck_interval=healthcheck.interval,
            healthcheck_threshold=healthcheck.threshold,
            health=health,
            display_order=app.order,
            hidden=app.hidden,
            open_in=open_in,
            display_group=app.group or None,
        )
        try:
            written = await upsert_app(self.db, row)
        except StoreError as exc:
            raise AppError(f"insert workspace app: {exc}") from exc
        if not written:
            raise AppError(f"insert workspace app: app {row.id} belongs to another workspace")

    async def list_sub_agents(
        self, request: agent_pb2.ListSubAgentsRequest
    ) -> agent_pb2.ListSubAgentsResponse:
        parent_id = await self._parent()
        children = await list_children(self.db, parent_id)
        return agent_pb2.ListSubAgentsResponse(
            agents=[
                # tokens are stored hashed: only CreateSubAgent returns one
                agent_pb2.SubAgent(name=c.name, id=c.id.bytes)
                for c in children
            ]
        )

    async def delete_sub_agent(
        self, request: agent_pb2.DeleteSubAgentRequest
    ) -> agent_pb2.DeleteSubAgentResponse:
        child_id = _uuid(request.id, "id")
        if not await delete_child(self.db, self.ident.agent_id, child_id):
            # not a live child of this agent: as for any foreign id, it does not exist for the caller
            raise RpcError(f'delete sub agent: agent "{child_id}" not found (id)')
        return agent_pb2.DeleteSubAgentResponse()


def build(scope: ConnectionScope) -> SubAgentsService:
    return SubAgentsService(db=scope.db, ident=scope.ident, now=scope.now)
