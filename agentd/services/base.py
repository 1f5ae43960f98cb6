"""What every per-connection API service shares.

Each API of spec §7 is one attrs class built once per authenticated agent connection with explicit
dependencies. It exposes its DRPC handlers by full RPC path; the connection composes them into one
registry. Handlers follow the agentd.drpc contract (unary: ``async def h(request) -> response``).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import attrs

AGENT = "/coder.agent.v2.Agent/"
TAILNET = "/coder.tailnet.v2.Tailnet/"

#: Prebuilt workspaces are owned by this system user (spec §4.4).
PREBUILDS_USER_ID = uuid.UUID("c42fdf75-3097-471c-8c33-fb52454d81c0")

#: Go's zero time, which Coder stores for "never" in NOT NULL timestamp columns.
ZERO_TIME = dt.datetime(1, 1, 1, tzinfo=dt.UTC)

Handler = Callable[..., Awaitable[Any]]


def utcnow() -> dt.datetime:
    """Wall-clock now in UTC: the default ``now`` every service takes (tests inject their own)."""
    return dt.datetime.now(dt.UTC)


Now = Callable[[], dt.datetime]


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


class Service(Protocol):
    """One API's per-connection object."""

    def handlers(self) -> Mapping[str, Handler]:
        """Full RPC path (``/coder.agent.v2.Agent/GetManifest``) → handler."""
        ...


def uuid_field(raw: bytes, field: str) -> uuid.UUID:
    """Parse a 16-byte UUID field of a request, naming the field on error (spec: ids are raw bytes)."""
    from agentd.drpc.errors import RpcError

    if len(raw) != 16:
        raise RpcError(f"invalid {field}: expected 16 bytes, got {len(raw)}")
    return uuid.UUID(bytes=bytes(raw))


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


@attrs.define
class WorkspaceCache:
    """Holds the workspace identity for one connection; the connection's refresher task keeps it current.

    Empty for prebuilds (spec §4.4): consumers then fall back to a database read or fail as the spec says.
    """

    value: WorkspaceIdentity | None = None

    def get(self) -> WorkspaceIdentity | None:
        return self.value


@attrs.frozen
class Settings:
    """Deployment settings the services read (spec §4.2); built from the daemon's configuration."""

    replica_id: uuid.UUID = attrs.field(factory=uuid.uuid4)
    access_url: str = "http://127.0.0.1:3113"
    app_hostname: str = ""
    stats_report_interval: dt.timedelta = dt.timedelta(seconds=30)
    disable_direct_connections: bool = False
    derp_force_websockets: bool = False
    external_auth_git_configs: int = 0
    #: (enabled, message, background_color) per configured announcement banner.
    announcement_banners: tuple[tuple[bool, str, str], ...] = ()
    service_banner: tuple[bool, str, str] = (False, "", "")
    experiments: frozenset[str] = frozenset()


@attrs.frozen
class Preload:
    """Per-connection state read once at connect, in the token lookup's query, for the services that
    would otherwise each ``load()`` it (spec §4.1 step 4): one round trip instead of one per service."""

    #: ``agentd.store.monitors.MemoryMonitor`` or None (the template defines none).
    memory_monitor: Any = None
    #: ``agentd.store.monitors.VolumeMonitor`` rows, ordered by path.
    volume_monitors: tuple[Any, ...] = ()


@attrs.frozen
class ConnectionScope:
    """Everything a per-connection service may depend on; each service module's ``build(scope)`` takes it.

    ``components`` is the daemon-wide :class:`agentd.components.Components` (batchers, coordinator, DERP
    map source, metrics), typed loosely here to keep this module free of their imports.
    """

    ident: AgentIdentity
    db: Any  # agentd.store.Database
    events: Any  # agentd.services.events.Events
    cache: WorkspaceCache
    settings: Settings
    components: Any  # agentd.components.Components
    now: Now = utcnow
    #: What the connect query already read (None: each service loads its own, e.g. in service tests).
    preload: Preload | None = None
