"""ScriptCompleted (spec §7.10): validation texts, stage/status mapping, timing rows, ownership."""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from typing import Any

import pytest
import trio
from google.protobuf import timestamp_pb2

from agentd.admin import create_workspace, validate_workspace_spec
from agentd.drpc.errors import RpcError
from agentd.model import AgentIdentity
from agentd.proto import agent_pb2
from agentd.services import scripts
from agentd.store import Database
from agentd.store.sessions import authenticate_agent
from agentd.testing import serve_agent
from tests.services.audit_support import T0, make_scope

Timing = agent_pb2.Timing
Request = agent_pb2.WorkspaceAgentScriptCompletedRequest


async def seed_scripts(db: Database, *names: str) -> tuple[AgentIdentity, uuid.UUID, dict[str, uuid.UUID]]:
    """A workspace whose agent has one script per name; returns identity, token and script ids."""
    tag = uuid.uuid4().hex[:10]
    spec = validate_workspace_spec(
        {
            "name": "dev",
            "owner": {"username": f"u-{tag}", "email": f"{tag}@example.com"},
            "agents": [
                {
                    "name": "main",
                    "scripts": [
                        {"display_name": n, "script": f"echo {n}", "run_on_start": True} for n in names
                    ],
                }
            ],
        }
    )
    created = await create_workspace(db, spec)
    ident = await authenticate_agent(db, created.agents[0].token)
    assert ident is not None
    rows = await db.fetchall(
        "SELECT id, display_name FROM workspace_agent_scripts WHERE workspace_agent_id = %s", [ident.agent_id]
    )
    return ident, created.agents[0].token, {r["display_name"]: r["id"] for r in rows}


def ts(when: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(when)
    return out


def request(
    script_id: bytes,
    *,
    start: timestamp_pb2.Timestamp | None = None,
    end: timestamp_pb2.Timestamp | None = None,
    exit_code: int = 0,
    stage: int = Timing.START,
    status: int = Timing.OK,
) -> agent_pb2.WorkspaceAgentScriptCompletedRequest:
    timing = Timing(script_id=script_id, exit_code=exit_code, stage=stage, status=status)  # type: ignore[arg-type]
    timing.start.CopyFrom(start if start is not None else ts(T0))
    timing.end.CopyFrom(end if end is not None else ts(T0 + dt.timedelta(seconds=3)))
    return Request(timing=timing)


async def timings(db: Database) -> list[dict[str, Any]]:
    return await db.fetchall(
        "SELECT script_id, started_at, ended_at, exit_code, stage::text AS stage, status::text AS status"
        " FROM workspace_agent_script_timings ORDER BY started_at"
    )


async def test_handler_path(db: Database) -> None:
    ident, _, _ = await seed_scripts(db)
    assert set(scripts.build(make_scope(db, ident)).handlers()) == {"/coder.agent.v2.Agent/ScriptCompleted"}


async def test_timing_row_written(db: Database) -> None:
    ident, _, ids = await seed_scripts(db, "setup")
    svc = scripts.build(make_scope(db, ident))
    response = await svc.script_completed(
        request(ids["setup"].bytes, exit_code=2, status=Timing.EXIT_FAILURE)
    )
    assert response == agent_pb2.WorkspaceAgentScriptCompletedResponse()
    assert await timings(db) == [
        {
            "script_id": ids["setup"],
            "started_at": T0,
            "ended_at": T0 + dt.timedelta(seconds=3),
            "exit_code": 2,
            "stage": "start",
            "status": "exit_failure",
        }
    ]


@pytest.mark.parametrize(
    ("stage", "status", "expected"),
    [
        (Timing.START, Timing.OK, ("start", "ok")),
        (Timing.STOP, Timing.TIMED_OUT, ("stop", "timed_out")),
        (Timing.CRON, Timing.PIPES_LEFT_OPEN, ("cron", "pipes_left_open")),
        (Timing.CRON, Timing.EXIT_FAILURE, ("cron", "exit_failure")),
    ],
)
def test_stage_status_mapping(stage: int, status: int, expected: tuple[str, str]) -> None:
    timing = scripts.validate_timing(request(uuid.uuid4().bytes, stage=stage, status=status))
    assert (timing.stage, timing.status) == expected


def test_start_equal_to_end_is_fine() -> None:
    timing = scripts.validate_timing(request(uuid.uuid4().bytes, start=ts(T0), end=ts(T0)))
    assert timing.started_at == timing.ended_at == T0


def _zero_go_time() -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=-62135596800)


VALIDATION_CASES: list[tuple[str, Any, str]] = [
    ("missing timing", Request(), "script timing is required (timing)"),
    (
        "short script id",
        request(b"\x01\x02\x03"),
        "script id from bytes: invalid UUID (got 3 bytes) (timing.script_id)",
    ),
    (
        "missing start",
        Request(timing=Timing(script_id=uuid.uuid4().bytes, end=ts(T0))),
        "script start time is required (timing.start)",
    ),
    (
        "missing end",
        Request(timing=Timing(script_id=uuid.uuid4().bytes, start=ts(T0))),
        "script end time is required (timing.end)",
    ),
    (
        "zero start",
        request(uuid.uuid4().bytes, start=timestamp_pb2.Timestamp()),
        "script start time must not be zero (timing.start)",
    ),
    (
        "Go zero end",
        request(uuid.uuid4().bytes, end=_zero_go_time()),
        "script end time must not be zero (timing.end)",
    ),
    (
        "invalid start",
        request(uuid.uuid4().bytes, start=timestamp_pb2.Timestamp(seconds=1, nanos=-5)),
        "script start time is invalid: seconds=1 nanos=-5 (timing.start)",
    ),
    (
        "invalid end",
        request(uuid.uuid4().bytes, end=timestamp_pb2.Timestamp(seconds=10**12)),
        "script end time is invalid: seconds=1000000000000 nanos=0 (timing.end)",
    ),
    (
        "start after end",
        request(uuid.uuid4().bytes, start=ts(T0 + dt.timedelta(seconds=1)), end=ts(T0)),
        "script start time 2026-11-26T12:00:01+00:00 is after end time 2026-11-26T12:00:00+00:00"
        " (timing.start)",
    ),
    ("unknown stage", request(uuid.uuid4().bytes, stage=7), "unknown script timing stage 7 (timing.stage)"),
    (
        "unknown status",
        request(uuid.uuid4().bytes, status=9),
        "unknown script timing status 9 (timing.status)",
    ),
]


async def test_validation_errors_name_the_field_and_write_nothing(db: Database) -> None:
    ident, _, _ = await seed_scripts(db, "setup")
    svc = scripts.build(make_scope(db, ident))
    for label, req, text in VALIDATION_CASES:
        with pytest.raises(RpcError) as err:
            await svc.script_completed(req)
        assert err.value.message == text, label
    assert await timings(db) == []


async def test_unknown_script_is_an_error(db: Database) -> None:
    ident, _, _ = await seed_scripts(db, "setup")
    svc = scripts.build(make_scope(db, ident))
    missing = uuid.uuid4()
    with pytest.raises(RpcError) as err:
        await svc.script_completed(request(missing.bytes))
    assert err.value.message == (
        f"insert workspace agent script timings into database: script {missing} not found for this agent"
        " (timing.script_id)"
    )


async def test_duplicate_report_is_an_error(db: Database) -> None:
    ident, _, ids = await seed_scripts(db, "setup")
    svc = scripts.build(make_scope(db, ident))
    await svc.script_completed(request(ids["setup"].bytes))
    with pytest.raises(RpcError) as err:
        await svc.script_completed(request(ids["setup"].bytes, exit_code=1))
    assert "was already reported (timing.start)" in err.value.message
    # A later run of the same script is a new row.
    later = T0 + dt.timedelta(minutes=1)
    await svc.script_completed(request(ids["setup"].bytes, start=ts(later), end=ts(later)))
    assert [(r["started_at"], r["exit_code"]) for r in await timings(db)] == [(T0, 0), (later, 0)]


async def test_another_agents_script_is_refused(db: Database) -> None:
    mine, _, _ = await seed_scripts(db, "setup")
    _, _, theirs = await seed_scripts(db, "their-setup")
    svc = scripts.build(make_scope(db, mine))
    with pytest.raises(RpcError) as err:
        await svc.script_completed(request(theirs["their-setup"].bytes))
    assert "not found for this agent" in err.value.message
    assert await timings(db) == []


async def test_end_to_end_through_serve_agent(db: Database, nursery: trio.Nursery) -> None:
    ident, token, ids = await seed_scripts(db, "setup", "teardown")
    agent = await nursery.start(functools.partial(serve_agent, db, token, services=("scripts",)))
    await agent.client.agent.ScriptCompleted(request(ids["setup"].bytes))
    await agent.client.agent.ScriptCompleted(
        request(
            ids["teardown"].bytes,
            start=ts(T0 + dt.timedelta(hours=1)),
            end=ts(T0 + dt.timedelta(hours=1)),
            stage=Timing.STOP,
        )
    )
    with pytest.raises(RpcError) as err:
        await agent.client.agent.ScriptCompleted(request(ids["setup"].bytes))
    assert "already reported" in err.value.message
    with pytest.raises(RpcError) as err:
        await agent.client.agent.ScriptCompleted(Request())
    assert err.value.message == "script timing is required (timing)"
    assert [(r["script_id"], r["stage"]) for r in await timings(db)] == [
        (ids["setup"], "start"),
        (ids["teardown"], "stop"),
    ]
    assert agent.ident.agent_id == ident.agent_id
    await agent.disconnect()
