"""Reads behind GetManifest (spec §7.1), in one round trip.

Coder runs six queries (the agent row, then apps, scripts with their latest timing, metadata
descriptions, the expanded workspace and devcontainers in parallel, then the owner's secrets). Here one
statement reads the agent row and aggregates the rest as JSON sub-selects, so a manifest costs one
round trip on one pooled connection and every part comes from the same snapshot.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

import attrs

from agentd.store.db import Database, Transaction

__all__ = [
    "ManifestAgent",
    "ManifestApp",
    "ManifestData",
    "ManifestDevcontainer",
    "ManifestMetadata",
    "ManifestScript",
    "ManifestSecret",
    "ManifestWorkspace",
    "get_manifest_data",
]


@attrs.frozen
class ManifestAgent:
    """The agent-row columns the manifest uses (AgentFn, spec §4.1)."""

    id: uuid.UUID
    name: str
    parent_id: uuid.UUID | None
    #: The decoded ``environment_variables`` jsonb: None for SQL NULL or JSON null, else any JSON value.
    environment_variables: Any
    directory: str
    motd_file: str


@attrs.frozen
class ManifestWorkspace:
    """The columns of ``workspaces_expanded`` the manifest uses."""

    id: uuid.UUID
    name: str
    owner_id: uuid.UUID
    owner_username: str


@attrs.frozen
class ManifestApp:
    id: uuid.UUID
    url: str | None
    external: bool
    slug: str
    display_name: str
    command: str | None
    icon: str
    subdomain: bool
    sharing_level: str
    healthcheck_url: str
    healthcheck_interval: int
    healthcheck_threshold: int
    health: str
    hidden: bool


@attrs.frozen
class ManifestScript:
    """One script with its latest timing (None when it never ran)."""

    id: uuid.UUID
    log_source_id: uuid.UUID
    log_path: str
    script: str
    cron: str
    run_on_start: bool
    run_on_stop: bool
    start_blocks_login: bool
    timeout_seconds: int
    display_name: str
    timing_started_at: dt.datetime | None
    timing_ended_at: dt.datetime | None
    timing_exit_code: int | None
    timing_stage: str | None
    timing_status: str | None


@attrs.frozen
class ManifestMetadata:
    display_name: str
    key: str
    script: str
    #: Seconds, as stored.
    interval: int
    #: Seconds, as stored.
    timeout: int


@attrs.frozen
class ManifestDevcontainer:
    id: uuid.UUID
    name: str
    workspace_folder: str
    config_path: str
    subagent_id: uuid.UUID | None


@attrs.frozen
class ManifestSecret:
    name: str
    env_name: str
    file_path: str
    value: str
    #: Set when ``value`` is encrypted at rest (Coder's dbcrypt); agentd itself stores plaintext.
    value_key_id: str | None = None


@attrs.frozen
class ManifestData:
    agent: ManifestAgent
    #: None when the workspace row does not exist.
    workspace: ManifestWorkspace | None
    apps: tuple[ManifestApp, ...]
    scripts: tuple[ManifestScript, ...]
    metadata: tuple[ManifestMetadata, ...]
    devcontainers: tuple[ManifestDevcontainer, ...]
    #: The workspace owner's secrets, ordered by name (all of them; the service filters).
    secrets: tuple[ManifestSecret, ...]


_MANIFEST_SQL = """
SELECT
    a.id, a.name, a.parent_id, a.environment_variables, a.directory, a.motd_file,
    (
        SELECT jsonb_build_object(
            'id', w.id, 'name', w.name, 'owner_id', w.owner_id, 'owner_username', w.owner_username)
        FROM workspaces_expanded w WHERE w.id = %(workspace_id)s
    ) AS workspace,
    (
        SELECT coalesce(jsonb_agg(jsonb_build_object(
            'id', p.id, 'url', p.url, 'external', p.external, 'slug', p.slug,
            'display_name', p.display_name, 'command', p.command, 'icon', p.icon,
            'subdomain', p.subdomain, 'sharing_level', p.sharing_level,
            'healthcheck_url', p.healthcheck_url, 'healthcheck_interval', p.healthcheck_interval,
            'healthcheck_threshold', p.healthcheck_threshold, 'health', p.health, 'hidden', p.hidden
        ) ORDER BY p.slug), '[]'::jsonb)
        FROM workspace_apps p WHERE p.agent_id = a.id
    ) AS apps,
    (
        SELECT coalesce(jsonb_agg(jsonb_build_object(
            'id', s.id, 'log_source_id', s.log_source_id, 'log_path', s.log_path, 'script', s.script,
            'cron', s.cron, 'run_on_start', s.run_on_start, 'run_on_stop', s.run_on_stop,
            'start_blocks_login', s.start_blocks_login, 'timeout_seconds', s.timeout_seconds,
            'display_name', s.display_name,
            'timing_started_at', t.started_at, 'timing_ended_at', t.ended_at,
            'timing_exit_code', t.exit_code, 'timing_stage', t.stage, 'timing_status', t.status
        ) ORDER BY s.created_at, s.id), '[]'::jsonb)
        FROM workspace_agent_scripts s
        LEFT JOIN LATERAL (
            SELECT st.started_at, st.ended_at, st.exit_code, st.stage, st.status
            FROM workspace_agent_script_timings st
            WHERE st.script_id = s.id
            ORDER BY st.started_at DESC
            LIMIT 1
        ) t ON true
        WHERE s.workspace_agent_id = a.id
    ) AS scripts,
    (
        SELECT coalesce(jsonb_agg(jsonb_build_object(
            'display_name', m.display_name, 'key', m.key, 'script', m.script,
            'interval', m.interval, 'timeout', m.timeout
        ) ORDER BY m.display_order, m.key), '[]'::jsonb)
        FROM workspace_agent_metadata m WHERE m.workspace_agent_id = a.id
    ) AS metadata,
    (
        SELECT coalesce(jsonb_agg(jsonb_build_object(
            'id', d.id, 'name', d.name, 'workspace_folder', d.workspace_folder,
            'config_path', d.config_path, 'subagent_id', d.subagent_id
        ) ORDER BY d.created_at, d.id), '[]'::jsonb)
        FROM workspace_agent_devcontainers d WHERE d.workspace_agent_id = a.id
    ) AS devcontainers,
    (
        SELECT coalesce(jsonb_agg(jsonb_build_object(
            'name', u.name, 'env_name', u.env_name, 'file_path', u.file_path, 'value', u.value,
            'value_key_id', u.value_key_id
        ) ORDER BY u.name), '[]'::jsonb)
        FROM user_secrets u
        WHERE u.user_id = (SELECT w.owner_id FROM workspaces w WHERE w.id = %(workspace_id)s)
    ) AS secrets
FROM workspace_agents a
WHERE a.id = %(agent_id)s AND NOT a.deleted
"""


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def _opt_uuid(value: Any) -> uuid.UUID | None:
    return None if value is None else _uuid(value)


def _opt_time(value: Any) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(str(value))


def _workspace(obj: Mapping[str, Any] | None) -> ManifestWorkspace | None:
    if obj is None:
        return None
    return ManifestWorkspace(
        id=_uuid(obj["id"]),
        name=obj["name"],
        owner_id=_uuid(obj["owner_id"]),
        owner_username=obj["owner_username"],
    )


def _app(obj: Mapping[str, Any]) -> ManifestApp:
    return ManifestApp(
        id=_uuid(obj["id"]),
        url=obj["url"],
        external=obj["external"],
        slug=obj["slug"],
        display_name=obj["display_name"],
        command=obj["command"],
        icon=obj["icon"],
        subdomain=obj["subdomain"],
        sharing_level=obj["sharing_level"],
        healthcheck_url=obj["healthcheck_url"],
        healthcheck_interval=obj["healthcheck_interval"],
        healthcheck_threshold=obj["healthcheck_threshold"],
        health=obj["health"],
        hidden=obj["hidden"],
    )


def _script(obj: Mapping[str, Any]) -> ManifestScript:
    return ManifestScript(
        id=_uuid(obj["id"]),
        log_source_id=_uuid(obj["log_source_id"]),
        log_path=obj["log_path"],
        script=obj["script"],
        cron=obj["cron"],
        run_on_start=obj["run_on_start"],
        run_on_stop=obj["run_on_stop"],
        start_blocks_login=obj["start_blocks_login"],
        timeout_seconds=obj["timeout_seconds"],
        display_name=obj["display_name"],
        timing_started_at=_opt_time(obj["timing_started_at"]),
        timing_ended_at=_opt_time(obj["timing_ended_at"]),
        timing_exit_code=obj["timing_exit_code"],
        timing_stage=obj["timing_stage"],
        timing_status=obj["timing_status"],
    )


def _metadata(obj: Mapping[str, Any]) -> ManifestMetadata:
    return ManifestMetadata(
        display_name=obj["display_name"],
        key=obj["key"],
        script=obj["script"],
        interval=obj["interval"],
        timeout=obj["timeout"],
    )


def _devcontainer(obj: Mapping[str, Any]) -> ManifestDevcontainer:
    return ManifestDevcontainer(
        id=_uuid(obj["id"]),
        name=obj["name"],
        workspace_folder=obj["workspace_folder"],
        config_path=obj["config_path"],
        subagent_id=_opt_uuid(obj["subagent_id"]),
    )


def _secret(obj: Mapping[str, Any]) -> ManifestSecret:
    return ManifestSecret(
        name=obj["name"],
        env_name=obj["env_name"],
        file_path=obj["file_path"],
        value=obj["value"],
        value_key_id=obj["value_key_id"],
    )


async def get_manifest_data(
    db: Database | Transaction, agent_id: uuid.UUID, workspace_id: uuid.UUID
) -> ManifestData | None:
    """Everything GetManifest needs for ``agent_id`` (None when the agent row is missing or deleted).

    ``workspace_id`` is the connection's authenticated workspace; secrets are its owner's.
    """
    row = await db.fetchone(_MANIFEST_SQL, {"agent_id": agent_id, "workspace_id": workspace_id})
    if row is None:
        return None
    return ManifestData(
        agent=ManifestAgent(
            id=_uuid(row["id"]),
            name=row["name"],
            parent_id=_opt_uuid(row["parent_id"]),
            environment_variables=row["environment_variables"],
            directory=row["directory"],
            motd_file=row["motd_file"],
        ),
        workspace=_workspace(row["workspace"]),
        apps=tuple(_app(a) for a in row["apps"]),
        scripts=tuple(_script(s) for s in row["scripts"]),
        metadata=tuple(_metadata(m) for m in row["metadata"]),
        devcontainers=tuple(_devcontainer(d) for d in row["devcontainers"]),
        secrets=tuple(_secret(s) for s in row["secrets"]),
    )
