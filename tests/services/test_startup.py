"""UpdateStartup (spec §7.6) against a real PostgreSQL: semver and subsystem validation, the row written."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.drpc.errors import RpcError
from agentd.model import AgentIdentity
from agentd.proto import agent_pb2
from agentd.services import lifecycle
from agentd.store import Database
from agentd.store.pubsub import PubSub
from tests.services.core_support import (
    Seeded,
    connect,
    listen,
    make_scope,
    owner_channel,
    seed,
    token_of,
)

S = agent_pb2.Startup


def request(version: str = "v2.25.1", directory: str = "/home/coder", subsystems: Any = ()) -> Any:
    return agent_pb2.UpdateStartupRequest(
        startup=S(version=version, expanded_directory=directory, subsystems=list(subsystems))
    )


async def startup_row(db: Database, agent_id: Any) -> dict[str, Any]:
    row = await db.fetchone(
        "SELECT version, expanded_directory, subsystems::text[] AS subsystems, api_version"
        " FROM workspace_agents WHERE id = %s",
        [agent_id],
    )
    assert row is not None
    return row


UNTOUCHED = {"version": "", "expanded_directory": "", "subsystems": [], "api_version": ""}


@pytest.fixture
async def seeded(db: Database) -> Seeded:
    return await seed(db)


def service(db: Database, ident: AgentIdentity, ps: PubSub | None = None) -> lifecycle.LifecycleService:
    return lifecycle.build(make_scope(db, ident, pubsub=ps))


@pytest.mark.parametrize(
    "version",
    [
        "v2.25.1",
        "v2.25.1-devel+abc",
        "v0.0.0",
        "v1",
        "v1.2",
        "v10.20.30-rc.1.alpha-x+build.5.001",
        "v1.0.0-0",
        "v1.0.0-x07",
        "v1.0.0+0001",
    ],
)
def test_go_semver_accepts(version: str) -> None:
    assert lifecycle.is_go_semver(version)


@pytest.mark.parametrize(
    "version",
    [
        "",
        "2.25.1",
        "V2.25.1",
        "v",
        "v01.2.3",
        "v1.02.3",
        "v1.2.03",
        "v1.2-pre",
        "v1-pre",
        "v1.2.3-",
        "v1.2.3-01",
        "v1.2.3-a..b",
        "v1.2.3+",
        "v1.2.3+a..b",
        "v1.2.3.4",
        "v1.2.3-a_b",
        "v1.2.3\n",
        "v1.2.3 ",
        "v\uff11.2.3",  # a full-width digit one
    ],
)
def test_go_semver_rejects(version: str) -> None:
    assert not lifecycle.is_go_semver(version)


async def test_startup_is_recorded(db: Database, seeded: Seeded, pubsub: PubSub) -> None:
    ident = attrs.evolve(seeded.main, api_version=(2, 3))
    req = request(
        "v2.25.1-devel+abc",
        "/home/coder/src",
        [S.EXECTRACE, S.ENVBOX, S.ENVBUILDER, S.ENVBOX, S.EXECTRACE],
    )
    async with listen(pubsub, owner_channel(ident)) as events:
        response = await service(db, ident, pubsub).update_startup(req)
        assert await events.drain() == {}  # no pubsub for startup
    # The response is the request's Startup, unchanged (duplicates and order included).
    assert response == req.startup
    assert await startup_row(db, seeded.main.agent_id) == {
        "version": "v2.25.1-devel+abc",
        "expanded_directory": "/home/coder/src",
        # De-duplicated and sorted by name.
        "subsystems": ["envbox", "envbuilder", "exectrace"],
        "api_version": "2.3",
    }
    assert await startup_row(db, seeded.other.agent_id) == UNTOUCHED


async def test_no_subsystems_and_default_api_version(db: Database, seeded: Seeded) -> None:
    await service(db, seeded.main).update_startup(request("v1.0.0", "/srv"))
    assert await startup_row(db, seeded.main.agent_id) == {
        "version": "v1.0.0",
        "expanded_directory": "/srv",
        "subsystems": [],
        "api_version": "2.10",
    }


async def test_validation_errors_write_nothing(db: Database, seeded: Seeded) -> None:
    svc = service(db, seeded.main)
    cases = [
        (request("2.25.1"), 'invalid agent semver version "2.25.1"'),
        (request(""), 'invalid agent semver version ""'),
        (request("v1.2.3\x00"), 'invalid agent semver version "v1.2.3\\x00"'),
        (request(subsystems=[S.SUBSYSTEM_UNSPECIFIED]), 'invalid agent subsystem "SUBSYSTEM_UNSPECIFIED"'),
        (request(subsystems=[S.ENVBOX, 9]), 'invalid agent subsystem "9"'),
        (agent_pb2.UpdateStartupRequest(), 'invalid agent semver version ""'),
    ]
    for req, text in cases:
        with pytest.raises(RpcError) as err:
            await svc.update_startup(req)
        assert err.value.message == text
    assert await startup_row(db, seeded.main.agent_id) == UNTOUCHED


async def test_missing_api_version_is_an_internal_error(db: Database, seeded: Seeded) -> None:
    ident = attrs.evolve(seeded.main, api_version=())  # type: ignore[arg-type]
    with pytest.raises(RpcError, match=r"^internal error; api version unspecified$"):
        await service(db, ident).update_startup(request())
    assert await startup_row(db, seeded.main.agent_id) == UNTOUCHED


async def test_database_rejection_is_reported(db: Database, seeded: Seeded) -> None:
    with pytest.raises(RpcError, match=r"^update workspace agent startup in database: .*too long"):
        await service(db, seeded.main).update_startup(request(directory="/" + "x" * 4096))


async def test_deleted_agent_is_an_error(db: Database, seeded: Seeded) -> None:
    await db.execute("UPDATE workspace_agents SET deleted = true WHERE id = %s", [seeded.main.agent_id])
    with pytest.raises(RpcError) as err:
        await service(db, seeded.main).update_startup(request())
    assert (
        err.value.message == f'get workspace agent by id "{seeded.main.agent_id}": sql: no rows in result set'
    )


async def test_end_to_end_records_the_negotiated_api_version(
    db: Database, seeded: Seeded, nursery: trio.Nursery
) -> None:
    # The agent dials with ?version=2.3: that is what UpdateStartup stores, not the server's newest.
    agent = await connect(nursery, db, token_of(seeded), version="2.3")
    req = request("v2.25.1", "/home/coder", [S.ENVBUILDER, S.ENVBOX])
    assert await agent.client.agent.UpdateStartup(req) == req.startup
    assert await startup_row(db, seeded.main.agent_id) == {
        "version": "v2.25.1",
        "expanded_directory": "/home/coder",
        "subsystems": ["envbox", "envbuilder"],
        "api_version": "2.3",
    }
    with pytest.raises(RpcError) as err:
        await agent.client.agent.UpdateStartup(request("2.25.1"))
    assert (err.value.code, err.value.message) == (0, 'invalid agent semver version "2.25.1"')


def _semver_oracle(v: str) -> bool:
    """golang.org/x/mod/semver's parse, step by step (independent of the service's regex)."""

    def number(s: str) -> tuple[str, str] | None:
        i = 0
        while i < len(s) and s[i] in "0123456789":
            i += 1
        if i == 0 or (s[0] == "0" and i > 1):
            return None
        return s[:i], s[i:]

    def ident_ok(ident: str, *, numeric_leading_zero_bad: bool) -> bool:
        if not ident or any(c not in ALNUM_HYPHEN for c in ident):
            return False
        return not (numeric_leading_zero_bad and ident.isdigit() and len(ident) > 1 and ident[0] == "0")

    if not v.startswith("v"):
        return False
    rest = v[1:]
    for i in range(3):
        parsed = number(rest)
        if parsed is None:
            return False
        rest = parsed[1]
        if rest == "" and i < 2:
            return True  # v1 and v1.2 shorthands
        if i < 2:
            if rest[0] != ".":
                return False
            rest = rest[1:]
    if rest.startswith("-"):
        pre, plus, rest = rest[1:].partition("+")
        if not all(ident_ok(p, numeric_leading_zero_bad=True) for p in pre.split(".")):
            return False
        rest = plus + rest
    if rest.startswith("+"):
        return all(ident_ok(b, numeric_leading_zero_bad=False) for b in rest[1:].split("."))
    return rest == ""


ALNUM_HYPHEN = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-")


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="v012.-+a_", max_size=14))
def test_go_semver_matches_a_step_by_step_parser(version: str) -> None:
    assert lifecycle.is_go_semver(version) == _semver_oracle(version)
