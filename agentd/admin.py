"""`agentd admin create-workspace`: a whole running workspace from one declarative TOML file.

The file is validated completely before the database is touched (unknown fields, wrong types, bad
enum values and duplicates are errors naming the field's path), then every row is written in one
transaction: owner user, organization, template and version, workspace, a succeeded `start` build
with its resource, and the agents with their apps, scripts (+ log sources), metadata descriptions,
resource monitors and devcontainers. Either all of it exists afterwards or none of it does.
"""

from __future__ import annotations

import json
import re
import tomllib
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from agentd.config import UserError
from agentd.store import Database, Transaction
from agentd.store.agents import token_digest

# Enum labels (spec/agent-api.md §10.1).
DISPLAY_APPS = ("vscode", "vscode_insiders", "web_terminal", "ssh_helper", "port_forwarding_helper")
SHARING_LEVELS = ("owner", "authenticated", "organization", "public")
OPEN_IN = ("tab", "window", "slim-window")
API_KEY_SCOPES = ("all", "no_user_data")
OPERATING_SYSTEMS = ("linux", "darwin", "windows")
ARCHITECTURES = ("amd64", "arm64", "armv7", "386")

_NAME_RE = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?$")
_SLUG_RE = re.compile(r"^[a-z0-9](?:-?[a-z0-9])*$")
_USERNAME_RE = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9-_.]*[a-zA-Z0-9])?$")


class SpecError(UserError):
    """The workspace file is not valid; the message names the file and the field."""


# ---------------------------------------------------------------------------------------------
# Declarative, strict validation of the TOML tables.


@attrs.frozen
class _F:
    """One allowed key: its kind, whether it is required, its default and an extra check."""

    kind: str  # "str", "int", "bool", "table", "strmap", "strlist"
    required: bool = False
    default: Any = None
    check: Callable[[Any], str | None] | None = None


def _one_of(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in options else f"must be one of {', '.join(options)}"

    return check


def _matches(pattern: re.Pattern[str], what: str, max_len: int = 64) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if len(value) > max_len:
            return f"must be at most {max_len} characters"
        return None if pattern.match(value) else f"must be {what}"

    return check


def _between(low: int, high: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"must be between {low} and {high}"

    return check


def _max_len(n: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if len(value) <= n else f"must be at most {n} characters"

    return check


def _subset(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        bad = [v for v in value if v not in options]
        return f"has unknown entries {bad}; allowed: {', '.join(options)}" if bad else None

    return check


_NAME = _matches(_NAME_RE, "letters, digits and inner hyphens")
_NONNEG = _between(0, 2**31 - 1)

_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "table": (lambda v: isinstance(v, dict), "a table"),
    "strmap": (
        lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
        "a table of strings",
    ),
    "strlist": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "an array of strings"),
}


def _table(
    raw: Any, fields: Mapping[str, _F], where: str, *, also_allowed: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Check one table against `fields`; returns it with defaults filled in."""
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: must be a table")
    for key in raw:
        if key not in fields and key not in also_allowed:
            allowed = ", ".join([*fields, *also_allowed])
            raise SpecError(f"{_join(where, key)}: unknown field (allowed: {allowed})")
    out: dict[str, Any] = {}
    for key, field in fields.items():
        path = _join(where, key)
        if key not in raw:
            if field.required:
                raise SpecError(f"{path}: required field is missing")
            out[key] = field.default() if callable(field.default) else field.default
            continue
        value = raw[key]
        ok, type_name = _KINDS[field.kind]
        if not ok(value):
            raise SpecError(f"{path}: must be {type_name}")
        if field.check is not None and (problem := field.check(value)) is not None:
            raise SpecError(f"{path}: {problem}")
        out[key] = value
    return out


def _array(raw: Any, where: str) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise SpecError(f"{where}: must be an array of tables ([[{where.split('.')[-1]}]])")
    return raw


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _unique(items: list[dict[str, Any]], key: str, where: str) -> None:
    seen: set[Any] = set()
    for i, item in enumerate(items):
        if item[key] in seen:
            raise SpecError(f"{where}[{i}].{key}: duplicate value {item[key]!r}")
        seen.add(item[key])


_TOP = {
    "name": _F("str", required=True, check=_NAME),
    "owner": _F("table", required=True),
    "organization": _F("table", default=dict),
    "template": _F("table", default=dict),
    "resource": _F("table", default=dict),
    "agents": _F("table"),  # array of tables
}
_OWNER = {
    "username": _F(
        "str", required=True, check=_matches(_USERNAME_RE, "a valid username (letters, digits, - _ .)")
    ),
    "email": _F("str", required=True, check=_max_len(256)),
    "name": _F("str", default=""),
}
_ORGANIZATION = {
    "name": _F("str", default="coder", check=_NAME),
    "display_name": _F("str", default=""),
    "description": _F("str", default=""),
    "icon": _F("str", default=""),
}
_TEMPLATE = {
    "name": _F("str", default="agentd", check=_NAME),
    "display_name": _F("str", default=""),
    "description": _F("str", default=""),
    "icon": _F("str", default=""),
    "version": _F("str", default="v1", check=_max_len(64)),
}
_RESOURCE = {
    "name": _F("str", default="workspace"),
    "type": _F("str", default="agentd_workspace"),
    "icon": _F("str", default=""),
    "instance_type": _F("str", default=""),
    "hide": _F("bool", default=False),
    "daily_cost": _F("int", default=0, check=_NONNEG),
}
_AGENT = {
    "name": _F("str", required=True, check=_NAME),
    "operating_system": _F("str", default="linux", check=_one_of(OPERATING_SYSTEMS)),
    "architecture": _F("str", default="amd64", check=_one_of(ARCHITECTURES)),
    "directory": _F("str", default="", check=_max_len(4096)),
    "environment_variables": _F("strmap", default=dict),
    "connection_timeout_seconds": _F("int", default=120, check=_NONNEG),
    "troubleshooting_url": _F("str", default=""),
    "motd_file": _F("str", default=""),
    "display_apps": _F("strlist", default=lambda: list(DISPLAY_APPS), check=_subset(DISPLAY_APPS)),
    "api_key_scope": _F("str", default="all", check=_one_of(API_KEY_SCOPES)),
    "display_order": _F("int", default=0, check=_NONNEG),
    "auth_token": _F("str", default=None),
    # arrays of tables / sub-tables, checked by their own tables
    "apps": _F("table"),
    "scripts": _F("table"),
    "metadata": _F("table"),
    "resources_monitoring": _F("table", default=dict),
    "devcontainers": _F("table"),
}
_APP = {
    "slug": _F(
        "str", required=True, check=_matches(_SLUG_RE, "lower-case letters, digits and single hyphens")
    ),
    "display_name": _F("str", default=None, check=_max_len(64)),
    "icon": _F("str", default="", check=_max_len(256)),
    "command": _F("str", default=None),
    "url": _F("str", default=None),
    "external": _F("bool", default=False),
    "subdomain": _F("bool", default=False),
    "sharing_level": _F("str", default="owner", check=_one_of(SHARING_LEVELS)),
    "hidden": _F("bool", default=False),
    "open_in": _F("str", default="slim-window", check=_one_of(OPEN_IN)),
    "display_group": _F("str", default=None),
    "tooltip": _F("str", default="", check=_max_len(2048)),
    "display_order": _F("int", default=0, check=_NONNEG),
    "healthcheck": _F("table", default=None),
}
_HEALTHCHECK = {
    "url": _F("str", required=True),
    "interval": _F("int", default=5, check=_between(1, 3600)),
    "threshold": _F("int", default=6, check=_between(1, 1000)),
}
_SCRIPT = {
    "display_name": _F("str", required=True, check=_max_len(127)),
    "icon": _F("str", default=""),
    "script": _F("str", required=True),
    "cron": _F("str", default=""),
    "log_path": _F("str", default=""),
    "run_on_start": _F("bool", default=False),
    "run_on_stop": _F("bool", default=False),
    "start_blocks_login": _F("bool", default=False),
    "timeout_seconds": _F("int", default=0, check=_NONNEG),
}
_METADATA = {
    "key": _F("str", required=True, check=_max_len(127)),
    "display_name": _F("str", required=True, check=_max_len(127)),
    "script": _F("str", required=True, check=_max_len(65535)),
    "interval": _F("int", default=10, check=_NONNEG),
    "timeout": _F("int", default=1, check=_NONNEG),
    "display_order": _F("int", default=0, check=_NONNEG),
}
_MONITORING = {
    "memory": _F("table", default=None),
    "volumes": _F("table"),
}
_MEMORY = {
    "enabled": _F("bool", default=True),
    "threshold": _F("int", required=True, check=_between(0, 100)),
}
_VOLUME = {
    "path": _F("str", required=True),
    "enabled": _F("bool", default=True),
    "threshold": _F("int", required=True, check=_between(0, 100)),
}
_DEVCONTAINER = {
    "name": _F("str", required=True),
    "workspace_folder": _F("str", required=True),
    "config_path": _F("str", default=""),
}
# Keys whose values are arrays of tables: validated element-wise, not by _KINDS.
_ARRAY_KEYS = {"agents", "apps", "scripts", "metadata", "volumes", "devcontainers"}


def _checked(raw: Any, fields: Mapping[str, _F], where: str) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Validate the scalar fields of a table; its array-of-table fields come back as lists."""
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: must be a table")
    array_keys = tuple(k for k in fields if k in _ARRAY_KEYS)
    scalars = {k: v for k, v in raw.items() if k not in array_keys}
    plain = {k: f for k, f in fields.items() if k not in array_keys}
    table = _table(scalars, plain, where, also_allowed=array_keys)
    return table, {k: _array(raw.get(k), _join(where, k)) for k in array_keys}


def validate_workspace_spec(raw: Mapping[str, Any], *, source: str = "workspace") -> dict[str, Any]:
    """Validate a parsed workspace file strictly; returns a normalised nested dict."""
    try:
        top, top_arrays = _checked(dict(raw), _TOP, "")
        spec: dict[str, Any] = {
            "name": top["name"],
            "owner": _table(top["owner"], _OWNER, "owner"),
            "organization": _table(top["organization"], _ORGANIZATION, "organization"),
            "template": _table(top["template"], _TEMPLATE, "template"),
            "resource": _table(top["resource"], _RESOURCE, "resource"),
            "agents": [],
        }
        agents_raw = top_arrays["agents"]
        if not agents_raw:
            raise SpecError("agents: at least one [[agents]] table is required")
        for i, agent_raw in enumerate(agents_raw):
            where = f"agents[{i}]"
            agent, arrays = _checked(agent_raw, _AGENT, where)
            if agent["auth_token"] is not None:
                try:
                    agent["auth_token"] = str(uuid.UUID(agent["auth_token"]))
                except ValueError:
                    raise SpecError(f"{where}.auth_token: must be a UUID") from None
            agent["apps"] = [_app(a, f"{where}.apps[{j}]") for j, a in enumerate(arrays["apps"])]
            agent["scripts"] = [
                _table(s, _SCRIPT, f"{where}.scripts[{j}]") for j, s in enumerate(arrays["scripts"])
            ]
            agent["metadata"] = [
                _table(m, _METADATA, f"{where}.metadata[{j}]") for j, m in enumerate(arrays["metadata"])
            ]
            agent["devcontainers"] = [
                _table(d, _DEVCONTAINER, f"{where}.devcontainers[{j}]")
                for j, d in enumerate(arrays["devcontainers"])
            ]
            monitoring, mon_arrays = _checked(
                agent["resources_monitoring"], _MONITORING, f"{where}.resources_monitoring"
            )
            agent["memory_monitor"] = (
                None
                if monitoring["memory"] is None
                else _table(monitoring["memory"], _MEMORY, f"{where}.resources_monitoring.memory")
            )
            agent["volume_monitors"] = [
                _table(v, _VOLUME, f"{where}.resources_monitoring.volumes[{j}]")
                for j, v in enumerate(mon_arrays["volumes"])
            ]
            del agent["resources_monitoring"]
            _unique(agent["apps"], "slug", f"{where}.apps")
            _unique(agent["metadata"], "key", f"{where}.metadata")
            _unique(agent["volume_monitors"], "path", f"{where}.resources_monitoring.volumes")
            _unique(agent["devcontainers"], "name", f"{where}.devcontainers")
            spec["agents"].append(agent)
        _unique(spec["agents"], "name", "agents")
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None
    return spec


def _app(raw: Any, where: str) -> dict[str, Any]:
    app = _table(raw, _APP, where)
    if app["healthcheck"] is not None:
        app["healthcheck"] = _table(app["healthcheck"], _HEALTHCHECK, f"{where}.healthcheck")
    if app["command"] is None and app["url"] is None:
        raise SpecError(f"{where}: needs a url or a command")
    if app["display_name"] is None:
        app["display_name"] = app["slug"]
    return app


def load_workspace_spec(path: Path) -> dict[str, Any]:
    """Read and validate a workspace file; every problem is a SpecError naming file and field."""
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found") from None
    except OSError as e:
        raise SpecError(f"{path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: invalid TOML: {e}") from None
    return validate_workspace_spec(raw, source=str(path))


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


async def create_workspace(db: Database, spec: Mapping[str, Any]) -> CreatedWorkspace:
    """Create everything `spec` (from `validate_workspace_spec`) describes, atomically."""
    async with db.transaction() as tx:
        return await _create(tx, spec)


async def _create(tx: Transaction, spec: Mapping[str, Any]) -> CreatedWorkspace:
    org_id = await _organization(tx, spec["organization"])
    owner_id = await _user(tx, spec["owner"])
    template_id, version_id = await _template(tx, spec["template"], org_id, owner_id)

    name = spec["name"]
    exists = await tx.fetchval(
        "SELECT 1 FROM workspaces WHERE owner_id = %s AND lower(name) = lower(%s) AND NOT deleted",
        [owner_id, name],
    )
    if exists:
        raise WorkspaceExists(f"workspace {name!r} already exists for owner {spec['owner']['username']!r}")
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
        [build_id, workspace_id, version_id, owner_id, job_id, spec["resource"]["daily_cost"]],
    )
    resource = spec["resource"]
    resource_id = uuid.uuid4()
    await tx.execute(
        "INSERT INTO workspace_resources (id, created_at, job_id, transition, type, name, hide, icon,"
        " instance_type, daily_cost) VALUES (%s, now(), %s, 'start', %s, %s, %s, %s, %s, %s)",
        [
            resource_id,
            job_id,
            resource["type"],
            resource["name"],
            resource["hide"],
            resource["icon"],
            resource["instance_type"] or None,
            resource["daily_cost"],
        ],
    )
    agents = tuple([await _agent(tx, agent, resource_id) for agent in spec["agents"]])
    return CreatedWorkspace(workspace_id, name, owner_id, build_id, agents)


async def _organization(tx: Transaction, org: Mapping[str, Any]) -> uuid.UUID:
    existing = await tx.fetchval(
        "SELECT id FROM organizations WHERE lower(name) = lower(%s) AND NOT deleted", [org["name"]]
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
            org["name"],
            org["description"],
            is_default,
            org["display_name"] or org["name"],
            org["icon"],
        ],
    )
    return org_id


async def _user(tx: Transaction, owner: Mapping[str, Any]) -> uuid.UUID:
    existing = await tx.fetchone(
        "SELECT id, email FROM users WHERE lower(username) = lower(%s) AND NOT deleted", [owner["username"]]
    )
    if existing is not None:
        return uuid.UUID(str(existing["id"]))
    taken = await tx.fetchval(
        "SELECT username FROM users WHERE lower(email) = lower(%s) AND NOT deleted", [owner["email"]]
    )
    if taken is not None:
        raise SpecError(f"owner.email: {owner['email']!r} already belongs to user {taken!r}")
    user_id = uuid.uuid4()
    await tx.execute(
        "INSERT INTO users (id, email, username, name, created_at, updated_at, login_type)"
        " VALUES (%s, %s, %s, %s, now(), now(), 'none')",
        [user_id, owner["email"], owner["username"], owner["name"]],
    )
    return user_id


async def _template(
    tx: Transaction, template: Mapping[str, Any], org_id: uuid.UUID, owner_id: uuid.UUID
) -> tuple[uuid.UUID, uuid.UUID]:
    row = await tx.fetchone(
        "SELECT id FROM templates WHERE organization_id = %s AND lower(name) = lower(%s) AND NOT deleted",
        [org_id, template["name"]],
    )
    if row is not None:
        template_id = uuid.UUID(str(row["id"]))
        version = await tx.fetchval(
            "SELECT id FROM template_versions WHERE template_id = %s AND name = %s",
            [template_id, template["version"]],
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
                template["name"],
                version_id,
                template["description"],
                owner_id,
                template["icon"],
                template["display_name"],
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
        [version_id, template_id, org_id, template["version"], import_job, owner_id],
    )
    await tx.execute(
        "UPDATE templates SET active_version_id = %s, updated_at = now() WHERE id = %s",
        [version_id, template_id],
    )
    return template_id, version_id


async def _agent(tx: Transaction, agent: Mapping[str, Any], resource_id: uuid.UUID) -> CreatedAgent:
    agent_id = uuid.uuid4()
    token = uuid.UUID(agent["auth_token"]) if agent["auth_token"] else uuid.uuid4()
    await tx.execute(
        "INSERT INTO workspace_agents (id, created_at, updated_at, name, resource_id, auth_token_hash,"
        " architecture, environment_variables, operating_system, directory, connection_timeout_seconds,"
        " troubleshooting_url, motd_file, display_apps, display_order, api_key_scope)"
        " VALUES (%s, now(), now(), %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s,"
        " %s::text[]::display_app[], %s, %s)",
        [
            agent_id,
            agent["name"],
            resource_id,
            token_digest(token),  # stored hashed: the plain token is printed once
            agent["architecture"],
            json.dumps(agent["environment_variables"]),
            agent["operating_system"],
            agent["directory"],
            agent["connection_timeout_seconds"],
            agent["troubleshooting_url"],
            agent["motd_file"],
            agent["display_apps"],
            agent["display_order"],
            agent["api_key_scope"],
        ],
    )
    for app in agent["apps"]:
        health = app["healthcheck"]
        await tx.execute(
            "INSERT INTO workspace_apps (id, created_at, agent_id, display_name, icon, command, url,"
            " healthcheck_url, healthcheck_interval, healthcheck_threshold, health, subdomain,"
            " sharing_level, slug, external, display_order, hidden, open_in, display_group, tooltip)"
            " VALUES (%s, now(), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [
                uuid.uuid4(),
                agent_id,
                app["display_name"],
                app["icon"],
                app["command"],
                app["url"],
                health["url"] if health else "",
                health["interval"] if health else 0,
                health["threshold"] if health else 0,
                "initializing" if health else "disabled",
                app["subdomain"],
                app["sharing_level"],
                app["slug"],
                app["external"],
                app["display_order"],
                app["hidden"],
                app["open_in"],
                app["display_group"],
                app["tooltip"],
            ],
        )
    for script in agent["scripts"]:
        source_id = uuid.uuid4()
        await tx.execute(
            "INSERT INTO workspace_agent_log_sources (workspace_agent_id, id, created_at, display_name, icon)"
            " VALUES (%s, %s, now(), %s, %s)",
            [agent_id, source_id, script["display_name"], script["icon"]],
        )
        await tx.execute(
            "INSERT INTO workspace_agent_scripts (workspace_agent_id, log_source_id, log_path, created_at,"
            " script, cron, start_blocks_login, run_on_start, run_on_stop, timeout_seconds, display_name, id)"
            " VALUES (%s, %s, %s, now(), %s, %s, %s, %s, %s, %s, %s, %s)",
            [
                agent_id,
                source_id,
                script["log_path"],
                script["script"],
                script["cron"],
                script["start_blocks_login"],
                script["run_on_start"],
                script["run_on_stop"],
                script["timeout_seconds"],
                script["display_name"],
                uuid.uuid4(),
            ],
        )
    for item in agent["metadata"]:
        await tx.execute(
            "INSERT INTO workspace_agent_metadata (workspace_agent_id, display_name, key, script, timeout,"
            " interval, display_order) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [
                agent_id,
                item["display_name"],
                item["key"],
                item["script"],
                item["timeout"],
                item["interval"],
                item["display_order"],
            ],
        )
    memory = agent["memory_monitor"]
    if memory is not None:
        await tx.execute(
            "INSERT INTO workspace_agent_memory_resource_monitors (agent_id, enabled, threshold, created_at)"
            " VALUES (%s, %s, %s, now())",
            [agent_id, memory["enabled"], memory["threshold"]],
        )
    for volume in agent["volume_monitors"]:
        await tx.execute(
            "INSERT INTO workspace_agent_volume_resource_monitors (agent_id, enabled, threshold, path,"
            " created_at) VALUES (%s, %s, %s, %s, now())",
            [agent_id, volume["enabled"], volume["threshold"], volume["path"]],
        )
    for container in agent["devcontainers"]:
        await tx.execute(
            "INSERT INTO workspace_agent_devcontainers (id, workspace_agent_id, workspace_folder,"
            " config_path, name) VALUES (%s, %s, %s, %s, %s)",
            [
                uuid.uuid4(),
                agent_id,
                container["workspace_folder"],
                container["config_path"],
                container["name"],
            ],
        )
    return CreatedAgent(agent["name"], agent_id, token)
