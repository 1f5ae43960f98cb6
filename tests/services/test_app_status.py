"""UpdateAppStatus (spec §7.18): limits and texts, the UI sanitiser, status rows, the
``agt_app_status_update`` event, AI-task notifications and the activity bump (§9.3)."""

from __future__ import annotations

import datetime as dt
import functools
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.admin import create_workspace, validate_workspace_spec
from agentd.drpc.errors import RpcError
from agentd.model import AgentIdentity
from agentd.proto import agent_pb2
from agentd.services import apps
from agentd.services.apps import go_unquote, strip_ansi, strip_html, ui_sanitize
from agentd.services.events import Events
from agentd.store import MISSED, Database, PubSub, Subscription
from agentd.store.sessions import authenticate_agent
from agentd.testing import serve_agent
from tests.services.audit_support import T0, FakeNow, make_scope

State = agent_pb2.UpdateAppStatusRequest.AppStatusState
Request = agent_pb2.UpdateAppStatusRequest


# ---------------------------------------------------------------------------------------------
# The sanitiser (pure)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Working on it", "Working on it"),
        ("  padded\t and   spaced \n out ", "padded and spaced out"),
        (r"line one\nline two", "line one line two"),  # Go escapes are interpreted
        (r"caf\u00e9 \x41\102 \U0001F600", "café AB \U0001f600"),
        (r"bad \q escape", r"bad \q escape"),  # not a valid Go string: kept as it is
        ('say "hi"', 'say "hi"'),  # an unescaped quote is not a Go string body either
        ("<b>bold</b> and <a href='x'>link</a>", "bold and link"),
        ("<script>alert(1)</script>safe<style>p{}</style>", "safe"),
        ("<!-- hidden -->shown", "shown"),
        ("a &amp; b &lt;tag&gt;", "a & b <tag>"),
        ("1 < 2 and 3 > 2", "1 < 2 and 3 > 2"),
        ("\x1b[31mred\x1b[0m text", "red text"),
        (r"\x1b[1;32mgreen\x1b[0m", "green"),  # escaped ANSI, unquoted, then stripped
        ("\x1b]0;title\x07after", "after"),
        ("nul\x00 bell\x07 zero\u200bwidth", "nul bell zerowidth"),
        ("done \u2705", "done \u2705"),
        ("", ""),
        ("   ", ""),
    ],
)
def test_ui_sanitize(raw: str, clean: str) -> None:
    assert ui_sanitize(raw) == clean


def test_go_unquote() -> None:
    assert go_unquote(r"tab\there") == "tab\there"
    assert go_unquote(r"\"quoted\"") == '"quoted"'
    assert go_unquote(r"\\") == "\\"
    assert go_unquote("trailing\\") is None
    assert go_unquote(r"\400") is None  # octal above 255
    assert go_unquote(r"\x4") is None
    assert go_unquote(r"\ud800") is None  # a surrogate is no code point
    assert go_unquote(r"\xff") == "\ufffd"  # a lone byte that is not UTF-8


def test_strip_helpers() -> None:
    assert strip_html("<p>x</p><br/>y") == "xy"
    assert strip_ansi("\x1b[2J\x1b[Hclear") == "clear"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_ui_sanitize_output_is_tidy(raw: str) -> None:
    out = ui_sanitize(raw)
    assert out == out.strip()
    assert "  " not in out
    assert all(ch == " " or ch.isprintable() for ch in out)
    assert "\x1b" not in out


# ---------------------------------------------------------------------------------------------
# The RPC


@attrs.frozen
class Seeded:
    ident: AgentIdentity
    token: uuid.UUID
    app_ids: dict[str, uuid.UUID]


async def seed_apps(db: Database) -> Seeded:
    tag = uuid.uuid4().hex[:10]
    spec = validate_workspace_spec(
        {
            "name": "dev",
            "owner": {"username": f"u-{tag}", "email": f"{tag}@example.com"},
            "agents": [
                {
                    "name": "main",
                    "apps": [{"slug": "claude", "command": "claude"}, {"slug": "term", "command": "bash"}],
                }
            ],
        }
    )
    created = await create_workspace(db, spec)
    ident = await authenticate_agent(db, created.agents[0].token)
    assert ident is not None
    rows = await db.fetchall("SELECT id, slug FROM workspace_apps WHERE agent_id = %s", [ident.agent_id])
    return Seeded(ident, created.agents[0].token, {r["slug"]: r["id"] for r in rows})


@pytest.fixture
async def pubsub(db: Database) -> AsyncIterator[PubSub]:
    ps = PubSub(db)
    async with trio.open_nursery() as nursery:
        await nursery.start(ps.run)
        yield ps
        nursery.cancel_scope.cancel()


@attrs.define
class RecordingBump:
    calls: list[tuple[uuid.UUID, dt.datetime]] = attrs.field(factory=list)

    async def __call__(self, workspace_id: uuid.UUID, now: dt.datetime) -> bool:
        await trio.lowlevel.checkpoint()
        self.calls.append((workspace_id, now))
        return True


def service(
    db: Database, seeded: Seeded, pubsub: PubSub, *, now: FakeNow | None = None, cached: bool = True
) -> apps.AppsService:
    scope = make_scope(db, seeded.ident, now=now or FakeNow(), cached=cached)
    return apps.build(attrs.evolve(scope, events=Events(pubsub)))


async def statuses(db: Database) -> list[dict[str, Any]]:
    return await db.fetchall(
        "SELECT created_at, workspace_id, agent_id, app_id, state::text AS state, message, uri"
        " FROM workspace_app_statuses ORDER BY created_at"
    )


async def next_event_of(sub: Subscription, kind: str) -> dict[str, Any]:
    with trio.fail_after(10):
        while True:
            payload = await sub.__anext__()
            assert payload is not MISSED and isinstance(payload, str)
            event = dict(json.loads(payload))
            if event["kind"] == kind:
                return event


async def test_status_row_and_event(db: Database, pubsub: PubSub) -> None:
    seeded = await seed_apps(db)
    svc = service(db, seeded, pubsub)
    async with pubsub.subscribe(f"workspace_owner:{seeded.ident.owner_id}") as sub:
        response = await svc.update_app_status(
            Request(
                slug="claude",
                state=State.IDLE,
                message="  <b>Waiting</b>\x1b[0m  for input ",
                uri="file:///x",
            )
        )
        assert response == agent_pb2.UpdateAppStatusResponse()
        assert await next_event_of(sub, "agt_app_status_update") == {
            "kind": "agt_app_status_update",
            "workspace_id": str(seeded.ident.workspace_id),
            "agent_id": str(seeded.ident.agent_id),
        }
    await svc.update_app_status(Request(slug="term", state=State.COMPLETE, message="ok"))
    assert await statuses(db) == [
        {
            "created_at": T0,
            "workspace_id": seeded.ident.workspace_id,
            "agent_id": seeded.ident.agent_id,
            "app_id": seeded.app_ids["claude"],
            "state": "idle",
            "message": "Waiting for input",
            "uri": "file:///x",
        },
        {
            "created_at": T0,
            "workspace_id": seeded.ident.workspace_id,
            "agent_id": seeded.ident.agent_id,
            "app_id": seeded.app_ids["term"],
            "state": "complete",
            "message": "ok",
            "uri": None,
        },
    ]


@pytest.mark.parametrize(
    ("state", "label"),
    [
        (State.WORKING, "working"),
        (State.IDLE, "idle"),
        (State.COMPLETE, "complete"),
        (State.FAILURE, "failure"),
    ],
)
async def test_state_mapping(db: Database, pubsub: PubSub, state: int, label: str) -> None:
    seeded = await seed_apps(db)
    await service(db, seeded, pubsub).update_app_status(Request(slug="claude", state=state))  # type: ignore[arg-type]
    assert [s["state"] for s in await statuses(db)] == [label]


async def test_message_limit_is_160_bytes(db: Database, pubsub: PubSub) -> None:
    seeded = await seed_apps(db)
    svc = service(db, seeded, pubsub)
    await svc.update_app_status(Request(slug="claude", message="x" * 160))
    await svc.update_app_status(Request(slug="claude", message="é" * 80))  # 160 bytes
    for too_long in ("x" * 161, "é" * 81):
        with pytest.raises(RpcError) as err:
            await svc.update_app_status(Request(slug="claude", message=too_long))
        assert err.value.message == (
            "unexpected status code 400: Message is too long."
            "\n\tError: Message must be less than 160 characters."
            "\n\tmessage: Message must be less than 160 characters."
        )
    assert len(await statuses(db)) == 2


async def test_errors(db: Database, pubsub: PubSub) -> None:
    seeded = await seed_apps(db)
    svc = service(db, seeded, pubsub)
    with pytest.raises(RpcError) as err:
        await svc.update_app_status(Request(slug="claude", state=7))  # type: ignore[arg-type]
    assert err.value.message == (
        "unexpected status code 400: Invalid state provided."
        '\n\tError: invalid state: "7"'
        "\n\tstate: State must be one of: complete, failure, working, idle."
    )
    with pytest.raises(RpcError) as err:
        await svc.update_app_status(Request(slug="nope"))
    assert err.value.message == (
        'unexpected status code 400: Failed to get workspace app.\n\tError: No app found with slug "nope"'
    )
    # Another agent's app is not found by slug either.
    other = await seed_apps(db)
    other_svc = service(db, other, pubsub)
    await other_svc.update_app_status(Request(slug="claude"))
    assert [s["agent_id"] for s in await statuses(db)] == [other.ident.agent_id]
    # A prebuild (no cached workspace identity) cannot report statuses.
    uncached = service(db, seeded, pubsub, cached=False)
    with pytest.raises(RpcError) as err:
        await uncached.update_app_status(Request(slug="claude"))
    assert err.value.message == "unexpected status code 500: Workspace identity not cached."
    assert len(await statuses(db)) == 1


async def test_activity_bump_rule(db: Database, pubsub: PubSub) -> None:
    """Bump when the new state is working, or the previous one was (and only then)."""
    seeded = await seed_apps(db)
    bump = RecordingBump()
    now = FakeNow()
    svc = attrs.evolve(service(db, seeded, pubsub, now=now), bump=bump)
    expected = [
        (State.IDLE, False),  # first status, not working
        (State.IDLE, False),
        (State.WORKING, True),
        (State.WORKING, True),
        (State.COMPLETE, True),  # leaving working
        (State.FAILURE, False),
    ]
    for state, bumped in expected:
        now.advance(seconds=1)
        before = len(bump.calls)
        await svc.update_app_status(Request(slug="claude", state=state))
        assert (len(bump.calls) > before) == bumped, State.Name(state)
    assert {ws for ws, _ in bump.calls} == {seeded.ident.workspace_id}


async def test_activity_bump_moves_the_deadline(db: Database, pubsub: PubSub) -> None:
    """The real bump (§9.3, through agentd.store.activity): a deadline 10 minutes away becomes now + the
    template's activity_bump (1 h by default)."""
    seeded = await seed_apps(db)
    await db.execute(
        "UPDATE workspace_builds SET deadline = %s WHERE id = %s",
        [T0 + dt.timedelta(minutes=10), seeded.ident.build_id],
    )
    await service(db, seeded, pubsub).update_app_status(Request(slug="claude", state=State.WORKING))
    deadline = await db.fetchval(
        "SELECT deadline FROM workspace_builds WHERE id = %s", [seeded.ident.build_id]
    )
    assert deadline == T0 + dt.timedelta(hours=1)


async def seed_task(db: Database, seeded: Seeded, app_slug: str) -> uuid.UUID:
    task_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO tasks (id, organization_id, owner_id, name, workspace_id, template_version_id)"
        " VALUES (%s, %s, %s, 'fix-the-bug', %s, %s)",
        [
            task_id,
            seeded.ident.organization_id,
            seeded.ident.owner_id,
            seeded.ident.workspace_id,
            seeded.ident.template_version_id,
        ],
    )
    await db.execute(
        "INSERT INTO task_workspace_apps"
        " (task_id, workspace_build_number, workspace_agent_id, workspace_app_id)"
        " VALUES (%s, 1, %s, %s)",
        [task_id, seeded.ident.agent_id, seeded.app_ids[app_slug]],
    )
    return task_id


async def notifications(db: Database) -> list[dict[str, Any]]:
    return await db.fetchall(
        "SELECT notification_template_id, user_id, created_by, payload, targets FROM notification_messages"
        " ORDER BY created_at"
    )


async def test_task_notifications(db: Database, pubsub: PubSub) -> None:
    seeded = await seed_apps(db)
    await seed_task(db, seeded, "claude")
    now = FakeNow()
    svc = service(db, seeded, pubsub, now=now)

    async def report(state: int, slug: str = "claude") -> None:
        now.advance(minutes=1)
        await svc.update_app_status(Request(slug=slug, state=state))  # type: ignore[arg-type]

    # Not ready yet: no notification while the workspace starts.
    await report(State.IDLE)
    assert await notifications(db) == []
    await db.execute(
        "UPDATE workspace_agents SET lifecycle_state = 'ready' WHERE id = %s", [seeded.ident.agent_id]
    )
    await report(State.IDLE)  # same state as before: no transition
    await report(State.WORKING)
    await report(State.COMPLETE)
    await report(State.FAILURE, slug="term")  # not the task's app
    await report(State.FAILURE)
    rows = await notifications(db)
    assert [r["notification_template_id"] for r in rows] == [
        apps.TASK_TEMPLATES["working"],
        apps.TASK_TEMPLATES["complete"],
        apps.TASK_TEMPLATES["failure"],
    ]
    first = rows[0]
    assert first["user_id"] == seeded.ident.owner_id
    assert first["created_by"] == "api-workspace-agent-app-status"
    assert first["payload"]["labels"] == {"task": "fix-the-bug", "workspace": "dev"}
    assert first["payload"]["data"] == {"dedupe_bypass_ts": "2026-11-26T12:03:00Z"}
    assert first["targets"] == [
        seeded.ident.workspace_id,
        seeded.ident.owner_id,
        seeded.ident.organization_id,
        seeded.app_ids["claude"],
    ]


async def test_first_working_status_does_not_notify(db: Database, pubsub: PubSub) -> None:
    seeded = await seed_apps(db)
    await seed_task(db, seeded, "claude")
    await db.execute(
        "UPDATE workspace_agents SET lifecycle_state = 'ready' WHERE id = %s", [seeded.ident.agent_id]
    )
    await service(db, seeded, pubsub).update_app_status(Request(slug="claude", state=State.WORKING))
    assert await notifications(db) == []
    assert len(await statuses(db)) == 1


async def test_end_to_end_through_serve_agent(db: Database, nursery: trio.Nursery, pubsub: PubSub) -> None:
    seeded = await seed_apps(db)
    async with pubsub.subscribe(f"workspace_owner:{seeded.ident.owner_id}") as sub:
        agent = await nursery.start(
            functools.partial(serve_agent, db, seeded.token, services=("apps",), events=Events(pubsub))
        )
        await agent.client.agent.UpdateAppStatus(
            Request(slug="claude", state=State.WORKING, message="Reading \\x41")
        )
        assert (await next_event_of(sub, "agt_app_status_update"))["agent_id"] == str(seeded.ident.agent_id)
        with pytest.raises(RpcError) as err:
            await agent.client.agent.UpdateAppStatus(Request(slug="claude", message="m" * 161))
        assert "Message is too long." in err.value.message and "\n\tmessage: " in err.value.message
        await agent.disconnect()
    [row] = await statuses(db)
    assert (row["state"], row["message"], row["app_id"]) == ("working", "Reading A", seeded.app_ids["claude"])
