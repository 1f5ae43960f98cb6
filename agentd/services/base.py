"""What every per-connection API service shares.

Each API of spec §7 is one attrs class built once per authenticated agent connection with explicit
dependencies. It exposes its DRPC handlers by full RPC path; the connection composes them into one
registry. Handlers follow the agentd.drpc contract (unary: ``async def h(request) -> response``).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

from agentd.clock import Now, utcnow
from agentd.drpc.registry import Handler
from agentd.model import AgentIdentity, WorkspaceIdentity

if TYPE_CHECKING:
    from agentd.components import Components
    from agentd.services.events import Events
    from agentd.store import Database
    from agentd.store.sessions import Preload

AGENT = "/coder.agent.v2.Agent/"


class Service(Protocol):
    """One API's per-connection object, as ``build(scope)`` returns it.

    Optionally it also has ``async def load(self) -> None`` (read its per-connection state before
    the first call; see :class:`Loads`) and ``async def run(self, *, task_status)`` (a long-lived
    task next to its calls; see :class:`Runs`). agentd.connection.ApiTask calls both if present.
    """

    def handlers(self) -> Mapping[str, Handler]:
        """Full RPC path (``/coder.agent.v2.Agent/GetManifest``) → handler."""
        ...


class Loads(Protocol):
    """A service that reads its per-connection state once, before its first call."""

    async def load(self) -> None: ...


class Runs(Protocol):
    """A service with a long-lived task of its own, started in its API's nursery."""

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


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
class ConnectionScope:
    """Everything a per-connection service may depend on; each service module's ``build(scope)`` takes it.

    ``components`` is the daemon-wide :class:`agentd.components.Components` (batchers, coordinator, DERP
    map source, metrics).
    """

    ident: AgentIdentity
    db: Database
    events: Events
    cache: WorkspaceCache
    settings: Settings
    components: Components
    now: Now = utcnow
    #: What the connect query already read (None: each service loads its own, e.g. in service tests).
    preload: Preload | None = None
