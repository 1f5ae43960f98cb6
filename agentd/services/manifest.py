"""GetManifest (spec §7.1): everything an agent needs to start, built from one fresh read per call.

The agent calls it once per connection; the first success in an agent process starts the startup
scripts, so every field must be exactly what Coder sends — including two oddities kept on purpose:
metadata intervals/timeouts are stored in seconds but shipped as *nanoseconds* (the agent reads them
back the same way), and ``derp_map.home_params`` is always present on the wire (the agent dereferences
it). No writes.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from google.protobuf import duration_pb2

from agentd.drpc.errors import RpcError
from agentd.drpc.registry import Handler
from agentd.proto import agent_pb2, tailnet_pb2
from agentd.services.base import AGENT, ConnectionScope, Settings
from agentd.services.logs import go_quote
from agentd.store import manifest as store
from agentd.tailnet.derpmap import DERPMapError, default_derp_map, with_home_params

__all__ = [
    "GIT_PROVIDER_TYPES",
    "ManifestService",
    "app_subdomain",
    "app_to_proto",
    "build",
    "environment_variables",
    "git_auth_config_count",
    "nanos_duration",
    "seconds_duration",
    "vscode_port_proxy_uri",
]

GET_MANIFEST = AGENT + "GetManifest"

#: External-auth provider types that count as Git hosts for ``git_auth_configs``.
GIT_PROVIDER_TYPES = frozenset(
    {"github", "gitlab", "bitbucket-cloud", "bitbucket-server", "azure-devops", "azure-devops-entra", "gitea"}
)

#: An app slug that looks like a port (``8080``, ``8443s``) gets the agent name in its subdomain.
_PORT_LIKE = re.compile(r"[0-9]{4,5}s?")

_NO_ROWS = "sql: no rows in result set"

_SHARING_LEVELS: Mapping[str, agent_pb2.WorkspaceApp.SharingLevel] = {
    "OWNER": agent_pb2.WorkspaceApp.OWNER,
    "AUTHENTICATED": agent_pb2.WorkspaceApp.AUTHENTICATED,
    "PUBLIC": agent_pb2.WorkspaceApp.PUBLIC,
    "ORGANIZATION": agent_pb2.WorkspaceApp.ORGANIZATION,
}
_HEALTHS: Mapping[str, agent_pb2.WorkspaceApp.Health] = {
    "DISABLED": agent_pb2.WorkspaceApp.DISABLED,
    "INITIALIZING": agent_pb2.WorkspaceApp.INITIALIZING,
    "HEALTHY": agent_pb2.WorkspaceApp.HEALTHY,
    "UNHEALTHY": agent_pb2.WorkspaceApp.UNHEALTHY,
}


def git_auth_config_count(provider_types: Iterable[str]) -> int:
    """How many configured external-auth providers are Git hosts (the manifest's ``git_auth_configs``)."""
    return sum(1 for t in provider_types if t in GIT_PROVIDER_TYPES)


def seconds_duration(seconds: int) -> duration_pb2.Duration:
    """``seconds`` seconds as a protobuf Duration."""
    return duration_pb2.Duration(seconds=seconds)


def nanos_duration(nanos: int) -> duration_pb2.Duration:
    """A Go ``time.Duration(nanos)`` through durationpb.New: truncated division, sign on both parts."""
    sign = -1 if nanos < 0 else 1
    secs, rest = divmod(abs(nanos), 1_000_000_000)
    return duration_pb2.Duration(seconds=sign * secs, nanos=sign * rest)


def _go_url_port(hostport: str) -> str:
    """Go's ``url.URL.Port()``: the digits after the last colon, or "" (also for ``[::1]`` without one)."""
    hostport = hostport.rpartition("@")[2]
    colon = hostport.rfind(":")
    if colon == -1:
        return ""
    port = hostport[colon + 1 :]
    return port if all("0" <= c <= "9" for c in port) else ""


def vscode_port_proxy_uri(
    access_url: str, app_hostname: str, agent_name: str, workspace_name: str, owner_username: str
) -> str:
    """The ``{{port}}`` URL template VS Code uses for port forwarding; "" without a wildcard app host.

    The app host gets the access URL's explicit port when it has none of its own.
    """
    if not app_hostname:
        return ""
    parsed = urllib.parse.urlsplit(access_url)
    host = app_hostname
    access_port = _go_url_port(parsed.netloc)
    if access_port and not _go_url_port(host):
        host += ":" + access_port
    slug = f"{{{{port}}}}--{agent_name}--{workspace_name}--{owner_username}"
    return f"{parsed.scheme}://" + host.replace("*", slug)


def app_subdomain(
    app: store.ManifestApp, app_hostname: str, agent_name: str, workspace_name: str, owner_username: str
) -> str:
    """``<slug>--<workspace>--<owner>`` (agent name inserted for port-like slugs), or "" when not served
    on a subdomain."""
    if not app_hostname or not app.subdomain or not (agent_name and workspace_name and owner_username):
        return ""
    slug = app.slug or app.display_name
    if _PORT_LIKE.fullmatch(slug):
        return f"{slug}--{agent_name}--{workspace_name}--{owner_username}"
    return f"{slug}--{workspace_name}--{owner_username}"


def app_to_proto(
    index: int,
    app: store.ManifestApp,
    app_hostname: str,
    agent_name: str,
    workspace_name: str,
    owner_username: str,
) -> agent_pb2.WorkspaceApp:
    """One app row as the manifest carries it; an unknown sharing level or health is an error."""
    sharing = _SHARING_LEVELS.get(app.sharing_level.upper())
    if sharing is None:
        raise RpcError(
            f"converting workspace apps: parse app {index} ({go_quote(app.slug)}): "
            f"unknown app sharing level: {go_quote(app.sharing_level)}"
        )
    health = _HEALTHS.get(app.health.upper())
    if health is None:
        raise RpcError(
            f"converting workspace apps: parse app {index} ({go_quote(app.slug)}): "
            f"unknown app health: {go_quote(app.health)}"
        )
    return agent_pb2.WorkspaceApp(
        id=app.id.bytes,
        url=app.url or "",
        external=app.external,
        slug=app.slug,
        display_name=app.display_name,
        command=app.command or "",
        icon=app.icon,
        subdomain=app.subdomain,
        subdomain_name=app_subdomain(app, app_hostname, agent_name, workspace_name, owner_username),
        sharing_level=sharing,
        healthcheck=agent_pb2.WorkspaceApp.Healthcheck(
            url=app.healthcheck_url,
            interval=seconds_duration(app.healthcheck_interval),
            threshold=app.healthcheck_threshold,
        ),
        health=health,
        hidden=app.hidden,
    )


def environment_variables(raw: Any) -> dict[str, str]:
    """The agent row's ``environment_variables`` jsonb as a string map, the way Go's ``json.Unmarshal``
    into ``map[string]string`` reads it: NULL / JSON null → empty, a null value → "", anything but an
    object of strings → error."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RpcError(
            f"unmarshal environment variables: expected a JSON object of strings, got {type(raw).__name__}"
        )
    envs: dict[str, str] = {}
    for key, value in raw.items():
        if value is None:
            value = ""
        elif not isinstance(value, str):
            raise RpcError(f"unmarshal environment variables: value of {go_quote(key)} is not a string")
        envs[key] = value
    return envs


def script_to_proto(script: store.ManifestScript) -> agent_pb2.WorkspaceAgentScript:
    # display_name (9) is deliberately not filled: Coder's main does not send it (spec §7.1).
    return agent_pb2.WorkspaceAgentScript(
        id=script.id.bytes,
        log_source_id=script.log_source_id.bytes,
        log_path=script.log_path,
        script=script.script,
        cron=script.cron,
        run_on_start=script.run_on_start,
        run_on_stop=script.run_on_stop,
        start_blocks_login=script.start_blocks_login,
        timeout=seconds_duration(script.timeout_seconds),
    )


def metadata_to_proto(item: store.ManifestMetadata) -> agent_pb2.WorkspaceAgentMetadata.Description:
    # The quirk of spec §7.1: stored seconds go out as nanoseconds (10 s -> Duration{nanos: 10}).
    return agent_pb2.WorkspaceAgentMetadata.Description(
        display_name=item.display_name,
        key=item.key,
        script=item.script,
        interval=nanos_duration(item.interval),
        timeout=nanos_duration(item.timeout),
    )


def devcontainer_to_proto(item: store.ManifestDevcontainer) -> agent_pb2.WorkspaceAgentDevcontainer:
    message = agent_pb2.WorkspaceAgentDevcontainer(
        id=item.id.bytes,
        name=item.name,
        workspace_folder=item.workspace_folder,
        config_path=item.config_path,
    )
    if item.subagent_id is not None:
        message.subagent_id = item.subagent_id.bytes
    return message


def secrets_to_proto(secrets: Iterable[store.ManifestSecret]) -> list[agent_pb2.WorkspaceSecret]:
    """The owner's secrets that are an env var or a file (others skipped), values as bytes.

    A value encrypted at rest (a ``value_key_id`` from Coder's dbcrypt) cannot be decrypted here; like
    coderd without the key, that is an error rather than ciphertext handed to the agent.
    """
    out: list[agent_pb2.WorkspaceSecret] = []
    for secret in secrets:
        if not (secret.env_name or secret.file_path):
            continue
        if secret.value_key_id:
            raise RpcError(
                f"getting user secrets: secret {go_quote(secret.name)} is encrypted with key"
                f" {go_quote(secret.value_key_id)}, which agentd cannot decrypt"
            )
        out.append(
            agent_pb2.WorkspaceSecret(
                env_name=secret.env_name, file_path=secret.file_path, value=secret.value.encode("utf-8")
            )
        )
    return out


def fallback_derp_map(settings: Settings) -> tailnet_pb2.DERPMap:
    """Coder's default map for this deployment's access URL, used when no DERP map source runs."""
    try:
        return default_derp_map(access_url=settings.access_url)
    except DERPMapError:
        return default_derp_map()


@attrs.define(eq=False)
class ManifestService:
    """GetManifest for one agent connection."""

    scope: ConnectionScope

    def handlers(self) -> dict[str, Handler]:
        return {GET_MANIFEST: self.get_manifest}

    def _derp_map(self) -> tailnet_pb2.DERPMap:
        source = getattr(self.scope.components, "derp_map", None)
        derp_map = source.current() if source is not None else fallback_derp_map(self.scope.settings)
        return with_home_params(derp_map)

    async def get_manifest(self, request: agent_pb2.GetManifestRequest) -> agent_pb2.Manifest:
        ident = self.scope.ident
        settings = self.scope.settings
        data = await store.get_manifest_data(self.scope.db, ident.agent_id, ident.workspace_id)
        if data is None:
            raise RpcError(
                f'getting workspace agent: get workspace agent by id "{ident.agent_id}": {_NO_ROWS}'
            )
        if data.workspace is None:
            raise RpcError(f"fetching workspace agent data: {_NO_ROWS}")
        agent, workspace = data.agent, data.workspace

        envs = environment_variables(agent.environment_variables)
        apps = [
            app_to_proto(i, app, settings.app_hostname, agent.name, workspace.name, workspace.owner_username)
            for i, app in enumerate(data.apps)
        ]
        manifest = agent_pb2.Manifest(
            agent_id=agent.id.bytes,
            agent_name=agent.name,
            owner_username=workspace.owner_username,
            workspace_id=workspace.id.bytes,
            workspace_name=workspace.name,
            git_auth_configs=settings.external_auth_git_configs,
            environment_variables=envs,
            directory=agent.directory,
            vs_code_port_proxy_uri=vscode_port_proxy_uri(
                settings.access_url,
                settings.app_hostname,
                agent.name,
                workspace.name,
                workspace.owner_username,
            ),
            motd_path=agent.motd_file,
            disable_direct_connections=settings.disable_direct_connections,
            derp_force_websockets=settings.derp_force_websockets,
            derp_map=self._derp_map(),
            scripts=[script_to_proto(s) for s in data.scripts],
            apps=apps,
            metadata=[metadata_to_proto(m) for m in data.metadata],
            devcontainers=[devcontainer_to_proto(d) for d in data.devcontainers],
            secrets=secrets_to_proto(data.secrets),
        )
        if agent.parent_id is not None:
            manifest.parent_id = agent.parent_id.bytes
        return manifest


def build(scope: ConnectionScope) -> ManifestService:
    """The connection's GetManifest service."""
    return ManifestService(scope=scope)
