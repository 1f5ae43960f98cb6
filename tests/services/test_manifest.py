"""GetManifest (spec §7.1): the pure field rules, then whole manifests built from a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import attrs
import pytest
import trio
from google.protobuf import duration_pb2

from agentd.components import Components
from agentd.drpc.errors import RpcError
from agentd.proto import agent_pb2, tailnet_pb2
from agentd.services import manifest
from agentd.services.base import AGENT, Settings
from agentd.store import Database
from agentd.store import manifest as store
from agentd.store.agents import token_digest
from agentd.tailnet.derpmap import DERPMapSource, default_derp_map
from tests.services.core_support import Seeded, connect, identity, make_scope, seed, token_of, workspace_spec

App = agent_pb2.WorkspaceApp
D = duration_pb2.Duration

# ---- pure rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("access_url", "app_hostname", "expected"),
    [
        ("https://coder.example.com", "", ""),
        (
            "https://coder.example.com",
            "*--apps.example.com",
            "https://{{port}}--main--ws--alice--apps.example.com",
        ),
        (
            "https://coder.example.com",
            "*.apps.example.com",
            "https://{{port}}--main--ws--alice.apps.example.com",
        ),
        # The access URL's explicit port is added to an app host without one ...
        (
            "http://coder.example.com:3000",
            "*.apps.example.com",
            "http://{{port}}--main--ws--alice.apps.example.com:3000",
        ),
        # ... but never replaces the app host's own.
        (
            "http://coder.example.com:3000",
            "*.apps.example.com:8443",
            "http://{{port}}--main--ws--alice.apps.example.com:8443",
        ),
        (
            "https://user:pw@coder.example.com",
            "*.apps.example.com",
            "https://{{port}}--main--ws--alice.apps.example.com",
        ),
        ("http://[::1]:7080", "*.localhost", "http://{{port}}--main--ws--alice.localhost:7080"),
        ("http://[::1]", "*.localhost", "http://{{port}}--main--ws--alice.localhost"),
    ],
)
def test_vscode_port_proxy_uri(access_url: str, app_hostname: str, expected: str) -> None:
    assert manifest.vscode_port_proxy_uri(access_url, app_hostname, "main", "ws", "alice") == expected


def _app(**kw: Any) -> store.ManifestApp:
    fields: dict[str, Any] = {
        "id": uuid.UUID(int=1),
        "url": None,
        "external": False,
        "slug": "code-server",
        "display_name": "Code Server",
        "command": None,
        "icon": "",
        "subdomain": True,
        "sharing_level": "owner",
        "healthcheck_url": "",
        "healthcheck_interval": 0,
        "healthcheck_threshold": 0,
        "health": "disabled",
        "hidden": False,
    }
    fields.update(kw)
    return store.ManifestApp(**fields)


@pytest.mark.parametrize(
    ("app", "app_hostname", "expected"),
    [
        (_app(), "*.apps.example.com", "code-server--ws--alice"),
        (_app(), "", ""),
        (_app(subdomain=False), "*.apps.example.com", ""),
        # Port-like slugs (4-5 digits, optional "s") carry the agent name.
        (_app(slug="8080"), "*.apps.example.com", "8080--main--ws--alice"),
        (_app(slug="65535s"), "*.apps.example.com", "65535s--main--ws--alice"),
        (_app(slug="123"), "*.apps.example.com", "123--ws--alice"),
        (_app(slug="123456"), "*.apps.example.com", "123456--ws--alice"),
        (_app(slug="8080ss"), "*.apps.example.com", "8080ss--ws--alice"),
        (_app(slug="８０８０"), "*.apps.example.com", "８０８０--ws--alice"),  # noqa: RUF001
        # No slug: the display name stands in.
        (_app(slug="", display_name="web"), "*.apps.example.com", "web--ws--alice"),
    ],
)
def test_app_subdomain(app: store.ManifestApp, app_hostname: str, expected: str) -> None:
    assert manifest.app_subdomain(app, app_hostname, "main", "ws", "alice") == expected


def test_app_subdomain_needs_every_name() -> None:
    assert manifest.app_subdomain(_app(), "*.a.com", "", "ws", "alice") == ""
    assert manifest.app_subdomain(_app(), "*.a.com", "main", "", "alice") == ""
    assert manifest.app_subdomain(_app(), "*.a.com", "main", "ws", "") == ""


def test_durations() -> None:
    assert manifest.seconds_duration(5) == D(seconds=5)
    # The metadata quirk: the stored integer is taken as nanoseconds.
    assert manifest.nanos_duration(10) == D(nanos=10)
    assert manifest.nanos_duration(3_000_000_001) == D(seconds=3, nanos=1)
    assert manifest.nanos_duration(-1_500_000_000) == D(seconds=-1, nanos=-500_000_000)
    assert manifest.nanos_duration(0) == D()


def test_environment_variables() -> None:
    assert manifest.environment_variables(None) == {}
    assert manifest.environment_variables({"A": "1"}) == {"A": "1"}
    # Go leaves a string untouched for a JSON null: the key is there with "".
    assert manifest.environment_variables({"A": None, "B": "x"}) == {"A": "", "B": "x"}
    with pytest.raises(RpcError, match=r"^unmarshal environment variables: .*list"):
        manifest.environment_variables(["A"])
    with pytest.raises(RpcError, match=r'^unmarshal environment variables: value of "N" is not a string$'):
        manifest.environment_variables({"N": 1})


def test_app_enum_mapping_and_errors() -> None:
    levels = {"owner": App.OWNER, "authenticated": App.AUTHENTICATED, "public": App.PUBLIC}
    levels["organization"] = App.ORGANIZATION
    for label, level in levels.items():
        assert manifest.app_to_proto(0, _app(sharing_level=label), "", "m", "w", "o").sharing_level == level
    healths = {"disabled": App.DISABLED, "initializing": App.INITIALIZING, "healthy": App.HEALTHY}
    healths["unhealthy"] = App.UNHEALTHY
    for label, value in healths.items():
        assert manifest.app_to_proto(0, _app(health=label), "", "m", "w", "o").health == value
    with pytest.raises(RpcError) as err:
        manifest.app_to_proto(3, _app(sharing_level="everyone"), "", "m", "w", "o")
    assert err.value.message == (
        'converting workspace apps: parse app 3 ("code-server"): unknown app sharing level: "everyone"'
    )
    with pytest.raises(RpcError, match=r'parse app 1 \("code-server"\): unknown app health: "sick"$'):
        manifest.app_to_proto(1, _app(health="sick"), "", "m", "w", "o")


def test_git_auth_config_count() -> None:
    types = ["github", "gitlab", "slack", "bitbucket-cloud", "bitbucket-server", "jfrog"]
    types += ["azure-devops", "azure-devops-entra", "gitea"]
    assert manifest.git_auth_config_count(types) == 7


def test_handlers() -> None:
    assert set(manifest.ManifestService(scope=None).handlers()) == {AGENT + "GetManifest"}  # type: ignore[arg-type]


# ---- whole manifests from the database ----------------------------------------------------------------

SETTINGS = Settings(
    access_url="https://coder.example.com",
    app_hostname="*.apps.example.com",
    disable_direct_connections=True,
    derp_force_websockets=True,
    external_auth_git_configs=2,
)

MAIN = {
    "directory": "/home/coder",
    "motd_file": "/etc/motd",
    "environment_variables": {"EDITOR": "vim", "LANG": "C.UTF-8"},
    "apps": [
        {
            "slug": "code-server",
            "display_name": "code-server",
            "icon": "/icon/code.svg",
            "url": "http://localhost:13337",
            "subdomain": True,
            "healthcheck": {"url": "http://localhost:13337/healthz", "interval": 5, "threshold": 6},
        },
        {"slug": "htop", "command": "htop", "open_in": "tab"},
        {"slug": "docs", "url": "https://coder.com/docs", "external": True, "sharing_level": "authenticated"},
        {
            "slug": "8080",
            "url": "http://localhost:8080",
            "subdomain": True,
            "sharing_level": "public",
            "hidden": True,
        },
    ],
    "scripts": [
        {
            "display_name": "Install",
            "script": "install.sh",
            "log_path": "install.log",
            "run_on_start": True,
            "start_blocks_login": True,
            "timeout_seconds": 300,
        },
        {"display_name": "Backup", "script": "backup.sh", "run_on_stop": True, "cron": "0 0 3 * * *"},
    ],
    "metadata": [
        {"key": "cpu", "display_name": "CPU", "script": "stat cpu", "interval": 10, "timeout": 1},
        {
            "key": "disk",
            "display_name": "Disk",
            "script": "stat disk",
            "interval": 60,
            "timeout": 5,
            "display_order": 1,
        },
    ],
    "devcontainers": [
        {"name": "app", "workspace_folder": "/home/coder/app", "config_path": "/x/devcontainer.json"}
    ],
}


@pytest.fixture
async def seeded(db: Database) -> Seeded:
    return await seed(db, workspace_spec(**MAIN))


async def add_secrets(db: Database, owner: uuid.UUID) -> None:
    for name, env_name, file_path, value in [
        ("b-token", "TOKEN", "", "s3cr3t"),
        ("a-key", "", "~/.ssh/id_ed25519", "-----BEGIN-----\n"),
        ("c-both", "BOTH", "/etc/both", "ünïcode"),
        ("d-neither", "", "", "skipped"),
    ]:
        await db.execute(
            "INSERT INTO user_secrets (id, user_id, name, value, env_name, file_path)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            [uuid.uuid4(), owner, name, value, env_name, file_path],
        )


async def add_subagent(db: Database, seeded: Seeded) -> uuid.UUID:
    sub = uuid.uuid4()
    await db.execute(
        "INSERT INTO workspace_agents (id, created_at, updated_at, name, resource_id, auth_token_hash,"
        " architecture, operating_system, directory, parent_id) VALUES (%s, now(), now(), 'main-app', %s, %s,"
        " 'amd64', 'linux', '/workspaces/app', %s)",
        [sub, seeded.main.resource_id, token_digest(uuid.uuid4()), seeded.main.agent_id],
    )
    await db.execute(
        "UPDATE workspace_agent_devcontainers SET subagent_id = %s WHERE workspace_agent_id = %s",
        [sub, seeded.main.agent_id],
    )
    return sub


async def expected_main_manifest(
    db: Database, seeded: Seeded, derp_map: tailnet_pb2.DERPMap
) -> agent_pb2.Manifest:
    """The manifest of agent "main", built from the rows independently of the service's converters."""
    ident = seeded.main
    apps = {
        r["slug"]: r
        for r in await db.fetchall(
            "SELECT id, slug FROM workspace_apps WHERE agent_id = %s", [ident.agent_id]
        )
    }
    scripts = {
        r["display_name"]: r
        for r in await db.fetchall(
            "SELECT id, log_source_id, display_name FROM workspace_agent_scripts"
            " WHERE workspace_agent_id = %s",
            [ident.agent_id],
        )
    }
    devcontainer = await db.fetchone(
        "SELECT id, subagent_id FROM workspace_agent_devcontainers WHERE workspace_agent_id = %s",
        [ident.agent_id],
    )
    assert devcontainer is not None
    ws, owner = ident.workspace_name, ident.owner_username
    expected = agent_pb2.Manifest(
        agent_id=ident.agent_id.bytes,
        agent_name="main",
        owner_username=owner,
        workspace_id=ident.workspace_id.bytes,
        workspace_name=ws,
        git_auth_configs=2,
        environment_variables={"EDITOR": "vim", "LANG": "C.UTF-8"},
        directory="/home/coder",
        vs_code_port_proxy_uri=f"https://{{{{port}}}}--main--{ws}--{owner}.apps.example.com",
        motd_path="/etc/motd",
        disable_direct_connections=True,
        derp_force_websockets=True,
        derp_map=derp_map,
        scripts=[
            agent_pb2.WorkspaceAgentScript(
                id=scripts["Install"]["id"].bytes,
                log_source_id=scripts["Install"]["log_source_id"].bytes,
                log_path="install.log",
                script="install.sh",
                run_on_start=True,
                start_blocks_login=True,
                timeout=D(seconds=300),
            ),
            agent_pb2.WorkspaceAgentScript(
                id=scripts["Backup"]["id"].bytes,
                log_source_id=scripts["Backup"]["log_source_id"].bytes,
                script="backup.sh",
                cron="0 0 3 * * *",
                run_on_stop=True,
                timeout=D(),
            ),
        ],
        # Ordered by slug.
        apps=[
            App(
                id=apps["8080"]["id"].bytes,
                url="http://localhost:8080",
                slug="8080",
                display_name="8080",
                subdomain=True,
                subdomain_name=f"8080--main--{ws}--{owner}",
                sharing_level=App.PUBLIC,
                healthcheck=App.Healthcheck(interval=D()),
                health=App.DISABLED,
                hidden=True,
            ),
            App(
                id=apps["code-server"]["id"].bytes,
                url="http://localhost:13337",
                slug="code-server",
                display_name="code-server",
                icon="/icon/code.svg",
                subdomain=True,
                subdomain_name=f"code-server--{ws}--{owner}",
                sharing_level=App.OWNER,
                healthcheck=App.Healthcheck(
                    url="http://localhost:13337/healthz", interval=D(seconds=5), threshold=6
                ),
                health=App.INITIALIZING,
            ),
            App(
                id=apps["docs"]["id"].bytes,
                url="https://coder.com/docs",
                external=True,
                slug="docs",
                display_name="docs",
                sharing_level=App.AUTHENTICATED,
                healthcheck=App.Healthcheck(interval=D()),
                health=App.DISABLED,
            ),
            App(
                id=apps["htop"]["id"].bytes,
                slug="htop",
                display_name="htop",
                command="htop",
                sharing_level=App.OWNER,
                healthcheck=App.Healthcheck(interval=D()),
                health=App.DISABLED,
            ),
        ],
        metadata=[
            agent_pb2.WorkspaceAgentMetadata.Description(
                display_name="CPU", key="cpu", script="stat cpu", interval=D(nanos=10), timeout=D(nanos=1)
            ),
            agent_pb2.WorkspaceAgentMetadata.Description(
                display_name="Disk", key="disk", script="stat disk", interval=D(nanos=60), timeout=D(nanos=5)
            ),
        ],
        devcontainers=[
            agent_pb2.WorkspaceAgentDevcontainer(
                id=devcontainer["id"].bytes,
                name="app",
                workspace_folder="/home/coder/app",
                config_path="/x/devcontainer.json",
            )
        ],
        secrets=[
            agent_pb2.WorkspaceSecret(file_path="~/.ssh/id_ed25519", value=b"-----BEGIN-----\n"),
            agent_pb2.WorkspaceSecret(env_name="TOKEN", value=b"s3cr3t"),
            agent_pb2.WorkspaceSecret(env_name="BOTH", file_path="/etc/both", value="ünïcode".encode()),
        ],
    )
    # Scripts come in creation order; admin creates them in one transaction (same created_at), so by id.
    ordered = sorted(expected.scripts, key=lambda script: uuid.UUID(bytes=script.id))
    del expected.scripts[:]
    expected.scripts.extend(ordered)
    if devcontainer["subagent_id"] is not None:
        expected.devcontainers[0].subagent_id = devcontainer["subagent_id"].bytes
    return expected


async def test_full_manifest(db: Database, seeded: Seeded) -> None:
    await add_secrets(db, seeded.main.owner_id)
    # Someone else's secrets never show up.
    other_user = uuid.uuid4()
    await db.execute(
        "INSERT INTO users (id, email, username, created_at, updated_at)"
        " VALUES (%s, 'bob@x', 'bob', now(), now())",
        [other_user],
    )
    await db.execute(
        "INSERT INTO user_secrets (id, user_id, name, value, env_name) VALUES (%s, %s, 'x', 'bob', 'BOB')",
        [uuid.uuid4(), other_user],
    )
    sub = await add_subagent(db, seeded)
    derp = DERPMapSource.from_config(access_url="https://relay.example.com")
    scope = make_scope(db, seeded.main, settings=SETTINGS, components=Components(derp_map=derp))
    got = await manifest.build(scope).get_manifest(agent_pb2.GetManifestRequest())

    expected = await expected_main_manifest(db, seeded, derp.current())
    assert expected.devcontainers[0].subagent_id == sub.bytes
    for field in expected.DESCRIPTOR.fields:
        assert getattr(got, field.name) == getattr(expected, field.name), field.name
    assert got == expected
    assert not got.HasField("parent_id")
    # home_params is on the wire even though it is empty.
    assert got.derp_map.HasField("home_params")
    assert agent_pb2.Manifest.FromString(got.SerializeToString()).derp_map.HasField("home_params")


async def test_sub_agent_manifest_has_parent_id(db: Database, seeded: Seeded) -> None:
    sub = await add_subagent(db, seeded)
    ident = await identity(db, sub)
    got = await manifest.build(make_scope(db, ident)).get_manifest(agent_pb2.GetManifestRequest())
    assert got.HasField("parent_id")
    assert got.parent_id == seeded.main.agent_id.bytes
    assert (got.agent_id, got.agent_name, got.directory) == (sub.bytes, "main-app", "/workspaces/app")
    # Nothing of the parent's leaks into the sub-agent's manifest.
    assert (list(got.apps), list(got.scripts), list(got.metadata), list(got.devcontainers)) == (
        [],
        [],
        [],
        [],
    )


async def test_defaults_without_app_host_or_derp_source(db: Database, seeded: Seeded) -> None:
    got = await manifest.build(make_scope(db, seeded.other)).get_manifest(agent_pb2.GetManifestRequest())
    assert got.agent_id == seeded.other.agent_id.bytes
    assert got.vs_code_port_proxy_uri == ""
    assert dict(got.environment_variables) == {}
    assert (got.git_auth_configs, got.disable_direct_connections, got.derp_force_websockets) == (
        0,
        False,
        False,
    )
    # No DERP map source configured: Coder's default map for the access URL, home_params present.
    assert got.derp_map == default_derp_map(access_url=Settings().access_url)
    assert got.derp_map.HasField("home_params")


async def test_manifest_rereads_the_agent_each_call(db: Database, seeded: Seeded) -> None:
    svc = manifest.build(make_scope(db, seeded.main))
    assert (await svc.get_manifest(agent_pb2.GetManifestRequest())).directory == "/home/coder"
    await db.execute(
        "UPDATE workspace_agents SET directory = '/srv', environment_variables = NULL WHERE id = %s",
        [seeded.main.agent_id],
    )
    got = await svc.get_manifest(agent_pb2.GetManifestRequest())
    assert (got.directory, dict(got.environment_variables)) == ("/srv", {})


async def test_bad_environment_json_is_an_error(db: Database, seeded: Seeded) -> None:
    for bad in (["A=1"], {"A": 1}, "text"):
        await db.execute(
            "UPDATE workspace_agents SET environment_variables = %s::jsonb WHERE id = %s",
            [json.dumps(bad), seeded.main.agent_id],
        )
        with pytest.raises(RpcError, match=r"^unmarshal environment variables: "):
            await manifest.build(make_scope(db, seeded.main)).get_manifest(agent_pb2.GetManifestRequest())


async def test_missing_agent_or_workspace(db: Database, seeded: Seeded) -> None:
    stranger = attrs.evolve(seeded.main, workspace_id=uuid.uuid4())
    with pytest.raises(RpcError) as err:
        await manifest.build(make_scope(db, stranger)).get_manifest(agent_pb2.GetManifestRequest())
    assert err.value.message == "fetching workspace agent data: sql: no rows in result set"

    await db.execute("UPDATE workspace_agents SET deleted = true WHERE id = %s", [seeded.main.agent_id])
    with pytest.raises(RpcError) as err:
        await manifest.build(make_scope(db, seeded.main)).get_manifest(agent_pb2.GetManifestRequest())
    assert err.value.message == (
        "getting workspace agent: get workspace agent by id"
        f' "{seeded.main.agent_id}": sql: no rows in result set'
    )


async def test_store_joins_each_script_with_its_latest_timing(db: Database, seeded: Seeded) -> None:
    script_id = await db.fetchval(
        "SELECT id FROM workspace_agent_scripts WHERE workspace_agent_id = %s AND display_name = 'Install'",
        [seeded.main.agent_id],
    )
    t0 = dt.datetime(2026, 11, 26, 10, 0, tzinfo=dt.UTC)
    for start, code, status in [(t0, 1, "exit_failure"), (t0 + dt.timedelta(hours=1), 0, "ok")]:
        await db.execute(
            "INSERT INTO workspace_agent_script_timings"
            " (script_id, started_at, ended_at, exit_code, stage, status)"
            " VALUES (%s, %s, %s, %s, 'start', %s)",
            [script_id, start, start + dt.timedelta(seconds=3), code, status],
        )
    data = await store.get_manifest_data(db, seeded.main.agent_id, seeded.main.workspace_id)
    assert data is not None
    by_name = {s.display_name: s for s in data.scripts}
    assert len(data.scripts) == 2
    install = by_name["Install"]
    assert (install.timing_started_at, install.timing_ended_at) == (
        t0 + dt.timedelta(hours=1),
        t0 + dt.timedelta(hours=1, seconds=3),
    )
    assert (install.timing_exit_code, install.timing_stage, install.timing_status) == (0, "start", "ok")
    assert by_name["Backup"].timing_started_at is None


async def test_end_to_end_manifest_over_the_wire(db: Database, seeded: Seeded, nursery: trio.Nursery) -> None:
    await add_secrets(db, seeded.main.owner_id)
    derp = DERPMapSource.from_config(access_url="https://relay.example.com")
    components = Components(derp_map=derp)
    agent = await connect(nursery, db, token_of(seeded), settings=SETTINGS, components=components)
    got = await agent.client.agent.GetManifest(agent_pb2.GetManifestRequest())
    # What crossed the wire is exactly what the service builds, home_params included.
    direct = await manifest.build(
        make_scope(db, seeded.main, settings=SETTINGS, components=components)
    ).get_manifest(agent_pb2.GetManifestRequest())
    assert got == direct
    assert got.derp_map.HasField("home_params")
    assert got.agent_id == seeded.main.agent_id.bytes
    assert [s.env_name for s in got.secrets] == ["", "TOKEN", "BOTH"]


def test_secrets_to_proto() -> None:
    def secret(name: str, env: str = "", path: str = "", key: str | None = None) -> store.ManifestSecret:
        return store.ManifestSecret(name=name, env_name=env, file_path=path, value="v", value_key_id=key)

    assert manifest.secrets_to_proto([secret("a", env="A"), secret("b"), secret("c", path="/c")]) == [
        agent_pb2.WorkspaceSecret(env_name="A", value=b"v"),
        agent_pb2.WorkspaceSecret(file_path="/c", value=b"v"),
    ]
    # Skipped secrets are not looked at, encrypted ones that would be sent are an error.
    assert manifest.secrets_to_proto([secret("x", key="k1")]) == []
    with pytest.raises(RpcError) as err:
        manifest.secrets_to_proto([secret("tok", env="TOKEN", key="k1")])
    assert (
        err.value.message
        == 'getting user secrets: secret "tok" is encrypted with key "k1", which agentd cannot decrypt'
    )
