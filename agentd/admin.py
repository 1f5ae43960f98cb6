"""`agentd admin create-workspace`: a whole running workspace from one declarative TOML file.

The file is validated completely before the database is touched (unknown fields, wrong types, bad
enum values and duplicates are errors naming the field's path), then every row is written in one
transaction: owner user, organization, template and version, workspace, a succeeded `start` build
with its resource, and the agents with their apps, scripts (+ log sources), metadata descriptions,
resource monitors and devcontainers. Either all of it exists afterwards or none of it does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import attrs
import msgspec

from agentd import typed_toml
from agentd.config import UserError
from agentd.store import Database, Transaction
from agentd.store.agents import token_digest
from agentd.typed_toml import expect

# Enum labels (spec/agent-api.md §10.1).
DisplayApp = Literal["vscode", "vscode_insiders", "web_terminal", "ssh_helper", "port_forwarding_helper"]
SharingLevel = Literal["owner", "authenticated", "organization", "public"]
OpenIn = Literal["tab", "window", "slim-window"]
ApiKeyScope = Literal["all", "no_user_data"]
OperatingSystem = Literal["linux", "darwin", "windows"]
Architecture = Literal["amd64", "arm64", "armv7", "386"]
DISPLAY_APPS: tuple[DisplayApp, ...] = get_args(DisplayApp)


def _one_of(labels: Any) -> msgspec.Meta:
    """An enum's error lists its labels in the declared order (msgspec's own order is sorted)."""
    return expect("one of " + ", ".join(get_args(labels)))


_NAME_RE = r"^[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?$"
_SLUG_RE = r"^[a-z0-9](?:-?[a-z0-9])*$"
_USERNAME_RE = r"^[a-zA-Z0-9](?:[a-zA-Z0-9-_.]*[a-zA-Z0-9])?$"


class SpecError(UserError):
    """The workspace file is not valid; the message names the file and the field."""


# ---------------------------------------------------------------------------------------------
# The file's shape: strict typed tables (unknown keys, wrong types, out-of-range values, bad enum
# labels and duplicates are errors naming the field's path; agentd.typed_toml words them).

Name = Annotated[
    str, expect("letters, digits and inner hyphens, at most 64 characters", pattern=_NAME_RE, max_length=64)
]
Slug = Annotated[
    str,
    expect(
        "lower-case letters, digits and single hyphens, at most 64 characters",
        pattern=_SLUG_RE,
        max_length=64,
    ),
]
Username = Annotated[
    str,
    expect(
        "a valid username (letters, digits, - _ .), at most 64 characters",
        pattern=_USERNAME_RE,
        max_length=64,
    ),
]
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Percent = Annotated[int, msgspec.Meta(ge=0, le=100)]
Text64 = Annotated[str, msgspec.Meta(max_length=64)]
Text127 = Annotated[str, msgspec.Meta(max_length=127)]
Text256 = Annotated[str, msgspec.Meta(max_length=256)]
Text2048 = Annotated[str, msgspec.Meta(max_length=2048)]
Text4096 = Annotated[str, msgspec.Meta(max_length=4096)]
Text65535 = Annotated[str, msgspec.Meta(max_length=65535)]


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A TOML table: immutable, and a key it does not declare is an error (subclasses repeat
    frozen and kw_only for the type checker)."""


def _unique(items: Sequence[Any], field: str, where: str) -> None:
    """Raise (for ``__post_init__``) naming ``where[i].field`` of the first repeated value."""
    seen: set[Any] = set()
    for i, item in enumerate(items):
        value = getattr(item, field)
        if value in seen:
            raise ValueError(f"{where}[{i}].{field}: duplicate value {value!r}")
        seen.add(value)


class Owner(_Table, frozen=True, kw_only=True):
    username: Username
    email: Text256
    name: str = ""


class Organization(_Table, frozen=True, kw_only=True):
    name: Name = "coder"
    display_name: str = ""
    description: str = ""
    icon: str = ""


class Template(_Table, frozen=True, kw_only=True):
    name: Name = "agentd"
    display_name: str = ""
    description: str = ""
    icon: str = ""
    version: Text64 = "v1"


class Resource(_Table, frozen=True, kw_only=True):
    name: str = "workspace"
    type: str = "agentd_workspace"
    icon: str = ""
    instance_type: str = ""
    hide: bool = False
    daily_cost: NonNegative = 0


class Healthcheck(_Table, frozen=True, kw_only=True):
    url: str
    interval: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 5
    threshold: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 6


class App(_Table, frozen=True, kw_only=True):
    slug: Slug
    #: Not in the file: the slug.
    display_name: Text64 | None = None
    icon: Text256 = ""
    command: str | None = None
    url: str | None = None
    external: bool = False
    subdomain: bool = False
    sharing_level: Annotated[SharingLevel, _one_of(SharingLevel)] = "owner"
    hidden: bool = False
    open_in: Annotated[OpenIn, _one_of(OpenIn)] = "slim-window"
    display_group: str | None = None
    tooltip: Text2048 = ""
    display_order: NonNegative = 0
    healthcheck: Healthcheck | None = None

    def __post_init__(self) -> None:
        if self.command is None and self.url is None:
            raise ValueError("needs a url or a command")
        if self.display_name is None:
            msgspec.structs.force_setattr(self, "display_name", self.slug)


class Script(_Table, frozen=True, kw_only=True):
    display_name: Text127
    icon: str = ""
    script: str
    cron: str = ""
    log_path: str = ""
    run_on_start: bool = False
    run_on_stop: bool = False
    start_blocks_login: bool = False
    timeout_seconds: NonNegative = 0


class Metadata(_Table, frozen=True, kw_only=True):
    key: Text127
    display_name: Text127
    script: Text65535
    interval: NonNegative = 10
    timeout: NonNegative = 1
    display_order: NonNegative = 0


class MemoryMonitor(_Table, frozen=True, kw_only=True):
    enabled: bool = True
    threshold: Percent


class VolumeMonitor(_Table, frozen=True, kw_only=True):
    path: str
    enabled: bool = True
    threshold: Percent


class ResourcesMonitoring(_Table, frozen=True, kw_only=True):
    memory: MemoryMonitor | None = None
    volumes: tuple[VolumeMonitor, ...] = ()

    def __post_init__(self) -> None:
        _unique(self.volumes, "path", "volumes")


class Devcontainer(_Table, frozen=True, kw_only=True):
    name: str
    workspace_folder: str
    config_path: str = ""


class Agent(_Table, frozen=True, kw_only=True):
    name: Name
    operating_system: Annotated[OperatingSystem, _one_of(OperatingSystem)] = "linux"
    architecture: Annotated[Architecture, _one_of(Architecture)] = "amd64"
    directory: Text4096 = ""
    environment_variables: dict[str, str] = msgspec.field(default_factory=dict)
    connection_timeout_seconds: NonNegative = 120
    troubleshooting_url: str = ""
    motd_file: str = ""
    display_apps: tuple[Annotated[DisplayApp, _one_of(DisplayApp)], ...] = DISPLAY_APPS
    api_key_scope: Annotated[ApiKeyScope, _one_of(ApiKeyScope)] = "all"
    display_order: NonNegative = 0
    #: None: a random token (printed once by create-workspace).
    auth_token: uuid.UUID | None = None
    apps: tuple[App, ...] = ()
    scripts: tuple[Script, ...] = ()
    metadata: tuple[Metadata, ...] = ()
    resources_monitoring: ResourcesMonitoring = msgspec.field(default_factory=ResourcesMonitoring)
    devcontainers: tuple[Devcontainer, ...] = ()

    def __post_init__(self) -> None:
        _unique(self.apps, "slug", "apps")
        _unique(self.metadata, "key", "metadata")
        _unique(self.devcontainers, "name", "devcontainers")


class WorkspaceSpec(_Table, frozen=True, kw_only=True):
    """A whole workspace file (examples/workspace.toml shows every section)."""

    name: Name
    owner: Owner
    organization: Organization = msgspec.field(default_factory=Organization)
    template: Template = msgspec.field(default_factory=Template)
    resource: Resource = msgspec.field(default_factory=Resource)
    agents: tuple[Agent, ...] = ()

    def __post_init__(self) -> None:
        if not self.agents:
            raise ValueError("agents: at least one [[agents]] table is required")
        _unique(self.agents, "name", "agents")


def validate_workspace_spec(raw: Mapping[str, Any], *, source: str = "workspace") -> WorkspaceSpec:
    """Validate a parsed workspace file strictly; a problem is a SpecError naming source and field."""
    try:
        return typed_toml.convert(raw, WorkspaceSpec)
    except typed_toml.Problem as problem:
        raise SpecError(f"{source}: {problem}") from None


def load_workspace_spec(path: Path) -> WorkspaceSpec:
    """Read and validate a workspace file; every problem is a SpecError naming file and field."""
    return validate_workspace_spec(typed_toml.read_toml(path, SpecError), source=str(path))


# ---------------------------------------------------------------------------------------------
# Writing the rows (one transaction).


@attrs.frozen
class CreatedAgent:
    name: str
    id: uuid.UUID
    token: uuid.UUID


@attrs.frozen
class CreatedWorkspace:
    workspace_id: uuid.UUID
    workspace_name: str
    owner_id: uuid.UUID
    build_id: uuid.UUID
    agents: tuple[CreatedAgent, ...]

    def to_json(self) -> dict[str, Any]:
        """The `--json` output: `{"workspace_id": ..., "agents": [{"name", "id", "token"}]}`."""
        return {
            "workspace_id": str(self.workspace_id),
            "agents": [{"name": a.name, "id": str(a.id), "token": str(a.token)} for a in self.agents],
        }


class WorkspaceExists(UserError):
    """The owner already has a (non-deleted) workspace of that name."""


async def create_workspace(db: Database, spec: WorkspaceSpec) -> CreatedWorkspace:
    """Create everything `spec` (from `validate_workspace_spec`) describes, atomically."""
    async with db.transaction() as tx:
        return await _create(tx, spec)


async def _create(tx: Transaction, spec: WorkspaceSpec) -> CreatedWorkspace:
    org_id = await _organization(tx, spec.organization)
    owner_id = await _user(tx, spec.owner)
    template_id, version_id = await _template(tx, spec.template, org_id, owner_id)

    name = spec.name
    exists = await tx.fetchval(
        "SELECT 1 FROM workspaces WHERE owner_id = %s AND lower(name) = lower(%s) AND NOT deleted",
        [owner_id, name],
    )
    if exists:
        raise WorkspaceExists(f"workspace {name!r} already exists for owner {spec.owner.username!r}")
    workspace_id = uuid.uuid4()
    await tx.execute(
        "INSERT INTO workspaces (id, created_at, updated_at, owner_id, organization_id, template_id, name)"
        " VALUES (%s, now(), now(), %s, %s, %s, %s)",
        [workspace_id, owner_id, org_id, template_id, name],
    )

    job_id = uuid.uuid4()
    await tx.execute(
        "INSERT INTO provisioner_jobs (id, created_at, updated_at, started_at, completed_at,"
        " organization_id, initiator_id, type, input)"
        " VALUES (%s, now(), now(), now(), now(), %s, %s, 'workspace_build', %s::jsonb)",
        [job_id, org_id, owner_id, f'{{"workspace_build_id": "{workspace_id}"}}'],
    )
    build_id = uuid.uuid4()
    await tx.execute(
        "INSERT INTO workspace_builds (id, created_at, updated_at, workspace_id, template_version_id,"
        " build_number, transition, initiator_id, job_id, daily_cost)"
        " VALUES (%s, now(), now(), %s, %s, 1, 'start', %s, %s, %s)",
        [build_id, workspace_id, version_id, owner_id, job_id, spec.resource.daily_cost],
    )
    resource = spec.resource
    resource_id = uuid.uuid4()
    await tx.execute(
        "INSERT INTO workspace_resources (id, created_at, job_id, transition, type, name, hide, icon,"
        " instance_type, daily_cost) VALUES (%s, now(), %s, 'start', %s, %s, %s, %s, %s, %s)",
        [
            resource_id,
            job_id,
            resource.type,
            resource.name,
            resource.hide,
            resource.icon,
            resource.instance_type or None,
            resource.daily_cost,
        ],
    )
    agents = tuple([await _agent(tx, agent, resource_id) for agent in spec.agents])
    return CreatedWorkspace(workspace_id, name, owner_id, build_id, agents)


async def _organization(tx: Transaction, org: Organization) -> uuid.UUID:
    existing = await tx.fetchval(
        "SELECT id FROM organizations WHERE lower(name) = lower(%s) AND NOT deleted", [org.name]
    )
    if existing is not None:
        return uuid.UUID(str(existing))
    org_id = uuid.uuid4()
    is_default = not await tx.fetchval("SELECT EXISTS (SELECT 1 FROM organizations WHERE is_default)")
    await tx.execute(
        "INSERT INTO organizations (id, name, description, created_at, updated_at, is_default,"
        " display_name, icon) VALUES (%s, %s, %s, now(), now(), %s, %s, %s)",
        [
            org_id,
            org.name,
            org.description,
            is_default,
            org.display_name or org.name,
            org.icon,
        ],
    )
    return org_id


async def _user(tx: Transaction, owner: Owner) -> uuid.UUID:
    existing = await tx.fetchone(
        "SELECT id, email FROM users WHERE lower(username) = lower(%s) AND NOT deleted", [owner.username]
    )
    if existing is not None:
        return uuid.UUID(str(existing["id"]))
    taken = await tx.fetchval(
        "SELECT username FROM users WHERE lower(email) = lower(%s) AND NOT deleted", [owner.email]
    )
    if taken is not None:
        raise SpecError(f"owner.email: {owner.email!r} already belongs to user {taken!r}")
    user_id = uuid.uuid4()
    await tx.execute(
        "INSERT INTO users (id, email, username, name, created_at, updated_at, login_type)"
        " VALUES (%s, %s, %s, %s, now(), now(), 'none')",
        [user_id, owner.email, owner.username, owner.name],
    )
    return user_id


async def _template(
    tx: Transaction, template: Template, org_id: uuid.UUID, owner_id: uuid.UUID
) -> tuple[uuid.UUID, uuid.UUID]:
    row = await tx.fetchone(
        "SELECT id FROM templates WHERE organization_id = %s AND lower(name) = lower(%s) AND NOT deleted",
        [org_id, template.name],
    )
    if row is not None:
        template_id = uuid.UUID(str(row["id"]))
        version = await tx.fetchval(
            "SELECT id FROM template_versions WHERE template_id = %s AND name = %s",
            [template_id, template.version],
        )
        if version is not None:
            return template_id, uuid.UUID(str(version))
        version_id = uuid.uuid4()
    else:
        template_id, version_id = uuid.uuid4(), uuid.uuid4()
        await tx.execute(
            "INSERT INTO templates (id, created_at, updated_at, organization_id, name, active_version_id,"
            " description, created_by, icon, display_name)"
            " VALUES (%s, now(), now(), %s, %s, %s, %s, %s, %s, %s)",
            [
                template_id,
                org_id,
                template.name,
                version_id,
                template.description,
                owner_id,
                template.icon,
                template.display_name,
            ],
        )
    import_job = uuid.uuid4()
    await tx.execute(
        "INSERT INTO provisioner_jobs (id, created_at, updated_at, started_at, completed_at,"
        " organization_id, initiator_id, type) VALUES (%s, now(), now(), now(), now(), %s, %s,"
        " 'template_version_import')",
        [import_job, org_id, owner_id],
    )
    await tx.execute(
        "INSERT INTO template_versions (id, template_id, organization_id, created_at, updated_at, name,"
        " job_id, created_by) VALUES (%s, %s, %s, now(), now(), %s, %s, %s)",
        [version_id, template_id, org_id, template.version, import_job, owner_id],
    )
    await tx.execute(
        "UPDATE templates SET active_version_id = %s, updated_at = now() WHERE id = %s",
        [version_id, template_id],
    )
    return template_id, version_id


async def _agent(tx: Transaction, agent: Agent, resource_id: uuid.UUID) -> CreatedAgent:
    agent_id = uuid.uuid4()
    token = agent.auth_token if agent.auth_token is not None else uuid.uuid4()
    await tx.execute(
        "INSERT INTO workspace_agents (id, created_at, updated_at, name, resource_id, auth_token_hash,"
        " architecture, environment_variables, operating_system, directory, connection_timeout_seconds,"
        " troubleshooting_url, motd_file, display_apps, display_order, api_key_scope)"
        " VALUES (%s, now(), now(), %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s,"
        " %s::text[]::display_app[], %s, %s)",
        [
            agent_id,
            agent.name,
            resource_id,
            token_digest(token),  # stored hashed: the plain token is printed once
            agent.architecture,
            json.dumps(agent.environment_variables),
            agent.operating_system,
            agent.directory,
            agent.connection_timeout_seconds,
            agent.troubleshooting_url,
            agent.motd_file,
            list(agent.display_apps),
            agent.display_order,
            agent.api_key_scope,
        ],
    )
    for app in agent.apps:
        health = app.healthcheck
        await tx.execute(
            "INSERT INTO workspace_apps (id, created_at, agent_id, display_name, icon, command, url,"
            " healthcheck_url, healthcheck_interval, healthcheck_threshold, health, subdomain,"
            " sharing_level, slug, external, display_order, hidden, open_in, display_group, tooltip)"
            " VALUES (%s, now(), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [
                uuid.uuid4(),
                agent_id,
                app.display_name,
                app.icon,
                app.command,
                app.url,
                health.url if health else "",
                health.interval if health else 0,
                health.threshold if health else 0,
                "initializing" if health else "disabled",
                app.subdomain,
                app.sharing_level,
                app.slug,
                app.external,
                app.display_order,
                app.hidden,
                app.open_in,
                app.display_group,
                app.tooltip,
            ],
        )
    for script in agent.scripts:
        source_id = uuid.uuid4()
        await tx.execute(
            "INSERT INTO workspace_agent_log_sources (workspace_agent_id, id, created_at, display_name, icon)"
            " VALUES (%s, %s, now(), %s, %s)",
            [agent_id, source_id, script.display_name, script.icon],
        )
        await tx.execute(
            "INSERT INTO workspace_agent_scripts (workspace_agent_id, log_source_id, log_path, created_at,"
            " script, cron, start_blocks_login, run_on_start, run_on_stop, timeout_seconds, display_name, id)"
            " VALUES (%s, %s, %s, now(), %s, %s, %s, %s, %s, %s, %s, %s)",
            [
                agent_id,
                source_id,
                script.log_path,
                script.script,
                script.cron,
                script.start_blocks_login,
                script.run_on_start,
                script.run_on_stop,
                script.timeout_seconds,
                script.display_name,
                uuid.uuid4(),
            ],
        )
    for item in agent.metadata:
        await tx.execute(
            "INSERT INTO workspace_agent_metadata (workspace_agent_id, display_name, key, script, timeout,"
            " interval, display_order) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [
                agent_id,
                item.display_name,
                item.key,
                item.script,
                item.timeout,
                item.interval,
                item.display_order,
            ],
        )
    memory = agent.resources_monitoring.memory
    if memory is not None:
        await tx.execute(
            "INSERT INTO workspace_agent_memory_resource_monitors (agent_id, enabled, threshold, created_at)"
            " VALUES (%s, %s, %s, now())",
            [agent_id, memory.enabled, memory.threshold],
        )
    for volume in agent.resources_monitoring.volumes:
        await tx.execute(
            "INSERT INTO workspace_agent_volume_resource_monitors (agent_id, enabled, threshold, path,"
            " created_at) VALUES (%s, %s, %s, %s, now())",
            [agent_id, volume.enabled, volume.threshold, volume.path],
        )
    for container in agent.devcontainers:
        await tx.execute(
            "INSERT INTO workspace_agent_devcontainers (id, workspace_agent_id, workspace_folder,"
            " config_path, name) VALUES (%s, %s, %s, %s, %s)",
            [
                uuid.uuid4(),
                agent_id,
                container.workspace_folder,
                container.config_path,
                container.name,
            ],
        )
    return CreatedAgent(agent.name, agent_id, token)
