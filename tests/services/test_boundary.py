"""ReportBoundaryLogs (spec §7.17) on PostgreSQL: lazy sessions, rows, log-only fallback, usage."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import uuid

import attrs
import pytest
import trio

from agentd.batchers.boundary_usage import BoundaryUsageTracker
from agentd.components import Components
from agentd.drpc.errors import RpcError
from agentd.model import AgentIdentity
from agentd.proto import agent_pb2
from agentd.services import boundary
from agentd.store import Database
from agentd.store.agents import token_digest
from agentd.testing import serve_agent
from tests.services.audit_support import (
    T0,
    FakeNow,
    make_scope,
    seed,
    seed_agent,
    seed_org_user,
    workspace_identity,
)

Request = agent_pb2.ReportBoundaryLogsRequest


def blog(
    seq: int,
    *,
    allowed: bool = True,
    method: str = "GET",
    url: str = "https://example.com/",
    rule: str = "domain=example.com",
    at: dt.datetime | None = None,
    resource: bool = True,
) -> agent_pb2.BoundaryLog:
    entry = agent_pb2.BoundaryLog(allowed=allowed, sequence_number=seq)
    if at is not None:
        entry.time.FromDatetime(at)
    if resource:
        entry.http_request.method = method
        entry.http_request.url = url
        entry.http_request.matched_rule = rule
    return entry


def request(session: str, logs: list[agent_pb2.BoundaryLog], process: str = "claude") -> Request:
    return Request(session_id=session, confined_process_name=process, logs=logs)


async def sessions(db: Database) -> list[dict[str, object]]:
    return await db.fetchall(
        "SELECT id, workspace_agent_id, owner_id, confined_process_name, started_at, updated_at"
        " FROM boundary_sessions ORDER BY started_at"
    )


async def logs(db: Database) -> list[dict[str, object]]:
    return await db.fetchall(
        "SELECT session_id, sequence_number, captured_at, created_at, proto, method, detail, matched_rule,"
        " owner_id FROM boundary_logs ORDER BY session_id, sequence_number"
    )


@pytest.fixture
def tracker(db: Database) -> BoundaryUsageTracker:
    return BoundaryUsageTracker(db=db, replica_id=uuid.uuid4())


def service(
    db: Database,
    ident: AgentIdentity,
    tracker: BoundaryUsageTracker | None = None,
    now: FakeNow | None = None,
) -> boundary.BoundaryLogsService:
    return boundary.build(make_scope(db, ident, components=Components(boundary_usage=tracker), now=now))


async def test_handler_path(db: Database) -> None:
    svc = service(db, await seed_agent(db))
    assert set(svc.handlers()) == {"/coder.agent.v2.Agent/ReportBoundaryLogs"}


async def test_empty_batch_returns_at_once(db: Database, tracker: BoundaryUsageTracker) -> None:
    svc = service(db, await seed_agent(db), tracker)
    resp = await svc.report_boundary_logs(request(str(uuid.uuid4()), []))
    assert resp == agent_pb2.ReportBoundaryLogsResponse()
    assert await sessions(db) == [] and not tracker.counter.dirty


async def test_batch_over_1000_is_refused_naming_the_limit(
    db: Database, tracker: BoundaryUsageTracker
) -> None:
    svc = service(db, await seed_agent(db), tracker)
    with pytest.raises(RpcError) as err:
        await svc.report_boundary_logs(request(str(uuid.uuid4()), [blog(i) for i in range(1001)]))
    assert "batch size 1001 exceeds maximum of 1000" in err.value.message
    assert "logs" in err.value.message
    assert err.value.code == 0
    assert await sessions(db) == [] and await logs(db) == [] and not tracker.counter.dirty
    # Exactly 1000 is fine.
    await svc.report_boundary_logs(request(str(uuid.uuid4()), [blog(i) for i in range(1000)]))
    assert len(await logs(db)) == 1000


async def test_two_batches_one_session_row_all_logs_in_order(
    db: Database, tracker: BoundaryUsageTracker
) -> None:
    ident = await seed_agent(db)
    now = FakeNow()
    svc = service(db, ident, tracker, now)
    sid = uuid.uuid4()
    event = T0 - dt.timedelta(seconds=3)
    await svc.report_boundary_logs(
        request(
            str(sid),
            [
                blog(1, at=event, method="POST", url="https://api.example.com/v1"),
                blog(0, allowed=False, at=event, rule="ignored-when-denied"),
                blog(2, rule=""),  # no time: event time = arrival; allowed with empty rule → NULL
            ],
        )
    )
    first_arrival = now()
    now.advance(seconds=30)
    await svc.report_boundary_logs(request(str(sid), [blog(3, allowed=False), blog(4)], process="other"))

    [s] = await sessions(db)
    assert s == {
        "id": sid,
        "workspace_agent_id": ident.agent_id,
        "owner_id": ident.owner_id,
        "confined_process_name": "claude",
        "started_at": first_arrival,
        "updated_at": first_arrival,
    }
    rows = await logs(db)
    assert [r["sequence_number"] for r in rows] == [0, 1, 2, 3, 4]
    assert {r["session_id"] for r in rows} == {sid}
    assert {r["owner_id"] for r in rows} == {ident.owner_id}
    assert {r["proto"] for r in rows} == {"http"}
    r0, r1, r2, r3, r4 = rows
    assert (r1["method"], r1["detail"], r1["matched_rule"]) == (
        "POST",
        "https://api.example.com/v1",
        "domain=example.com",
    )
    assert r0["matched_rule"] is None  # denied
    assert r2["matched_rule"] is None  # allowed, empty rule
    assert (r0["created_at"], r0["captured_at"]) == (event, first_arrival)
    assert (r2["created_at"], r2["captured_at"]) == (first_arrival, first_arrival)
    assert (r3["captured_at"], r4["captured_at"]) == (now(), now())
    assert svc.ensured == {sid}
    assert (tracker.counter.allowed, tracker.counter.denied) == (3, 2)
    assert tracker.counter.workspaces == {ident.workspace_id} and tracker.counter.users == {ident.owner_id}


async def test_ensured_session_is_not_inserted_again_on_this_connection(db: Database) -> None:
    ident = await seed_agent(db)
    svc = service(db, ident)
    sid = uuid.uuid4()
    await svc.report_boundary_logs(request(str(sid), [blog(0)]))
    await db.execute("DELETE FROM boundary_sessions")
    await svc.report_boundary_logs(request(str(sid), [blog(1)]))
    assert await sessions(db) == []  # remembered as ensured: no second insert
    assert len(await logs(db)) == 2


async def test_same_session_from_two_connections_keeps_the_first_creator(db: Database) -> None:
    a = await seed_agent(db, agent_name="a")
    b = await seed_agent(db, agent_name="b")
    now = FakeNow()
    first, second = service(db, a, now=now), service(db, b, now=now)
    sid = uuid.uuid4()
    await first.report_boundary_logs(request(str(sid), [blog(0)], process="one"))
    t_first = now()
    now.advance(seconds=5)
    await second.report_boundary_logs(request(str(sid), [blog(1)], process="two"))
    [s] = await sessions(db)
    assert (s["workspace_agent_id"], s["owner_id"], s["confined_process_name"], s["started_at"]) == (
        a.agent_id,
        a.owner_id,
        "one",
        t_first,
    )
    assert second.ensured == {sid}  # the conflict counted as success
    assert [r["sequence_number"] for r in await logs(db)] == [0, 1]
    # Each connection's logs carry its own workspace owner.
    assert [r["owner_id"] for r in await logs(db)] == [a.owner_id, b.owner_id]


@pytest.mark.parametrize("session_id", ["", "not-a-uuid", "1234"])
async def test_missing_or_invalid_session_is_log_only(
    db: Database, tracker: BoundaryUsageTracker, caplog: pytest.LogCaptureFixture, session_id: str
) -> None:
    ident = await seed_agent(db)
    svc = service(db, ident, tracker)
    caplog.set_level(logging.DEBUG, logger="agentd.boundary")
    event = T0 - dt.timedelta(milliseconds=1500)
    await svc.report_boundary_logs(
        request(
            session_id,
            [blog(7, at=event, url="https://a/"), blog(8, allowed=False, method="PUT", url="https://b/")],
        )
    )
    assert await sessions(db) == [] and await logs(db) == []
    lines = [r for r in caplog.records if r.msg.startswith("boundary_request")]
    assert len(lines) == 2
    allow, deny = lines
    assert allow.levelno == logging.INFO
    fields = (
        "decision",
        "session_id",
        "sequence_number",
        "workspace_id",
        "template_id",
        "template_version_id",
        "http_method",
        "http_url",
        "event_time",
    )
    assert {f: getattr(allow, f) for f in fields} == {
        "decision": "allow",
        "session_id": session_id,
        "sequence_number": 7,
        "workspace_id": str(ident.workspace_id),
        "template_id": str(ident.template_id),
        "template_version_id": str(ident.template_version_id),
        "http_method": "GET",
        "http_url": "https://a/",
        "event_time": "2026-11-26T11:59:58.5Z",
    }
    assert allow.matched_rule == "domain=example.com"  # type: ignore[attr-defined]
    assert (deny.decision, deny.http_method, deny.http_url) == ("deny", "PUT", "https://b/")  # type: ignore[attr-defined]
    assert not hasattr(deny, "matched_rule")
    if session_id:
        assert any("invalid boundary session id" in r.getMessage() for r in caplog.records)
    # Usage is still tracked.
    assert (tracker.counter.allowed, tracker.counter.denied) == (1, 1)


async def test_unknown_resources_are_skipped_and_counted(
    db: Database, tracker: BoundaryUsageTracker, caplog: pytest.LogCaptureFixture
) -> None:
    svc = service(db, await seed_agent(db), tracker)
    caplog.set_level(logging.INFO, logger="agentd.boundary")
    sid = uuid.uuid4()
    await svc.report_boundary_logs(
        request(str(sid), [blog(0, resource=False), blog(1), blog(2, resource=False)])
    )
    assert [r["sequence_number"] for r in await logs(db)] == [1]
    assert (tracker.counter.allowed, tracker.counter.denied) == (1, 0)
    assert any("skipped 2 boundary logs with an unknown resource" in r.getMessage() for r in caplog.records)
    assert len([r for r in caplog.records if r.msg.startswith("boundary_request")]) == 1


async def test_batch_of_only_unknown_resources_tracks_nothing(
    db: Database, tracker: BoundaryUsageTracker
) -> None:
    svc = service(db, await seed_agent(db), tracker)
    await svc.report_boundary_logs(request(str(uuid.uuid4()), [blog(0, resource=False)]))
    assert not tracker.counter.dirty
    assert await logs(db) == []


async def test_negative_sequence_number_rejects_only_that_log(
    db: Database, tracker: BoundaryUsageTracker, caplog: pytest.LogCaptureFixture
) -> None:
    svc = service(db, await seed_agent(db), tracker)
    caplog.set_level(logging.INFO, logger="agentd.boundary")
    await svc.report_boundary_logs(request(str(uuid.uuid4()), [blog(0), blog(-1), blog(1)]))
    assert [r["sequence_number"] for r in await logs(db)] == [0, 1]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "negative sequence_number -1" in errors[0].getMessage()
    assert tracker.counter.allowed == 3


async def test_failed_session_insert_keeps_logs_and_retries_next_batch(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    real = await seed_agent(db)
    ghost = attrs.evolve(real, agent_id=uuid.uuid4())  # no agent row yet: the session FK fails
    svc = service(db, ghost)
    sid = uuid.uuid4()
    caplog.set_level(logging.ERROR, logger="agentd.boundary")
    await svc.report_boundary_logs(request(str(sid), [blog(0)]))
    assert await sessions(db) == []
    assert [r["sequence_number"] for r in await logs(db)] == [0]  # not lost
    assert sid not in svc.ensured
    assert any(f"create boundary session {sid} failed" in r.getMessage() for r in caplog.records)

    await db.execute(
        "INSERT INTO workspace_agents (id, created_at, updated_at, name, resource_id, auth_token_hash,"
        " architecture, operating_system) VALUES (%s, now(), now(), 'ghost', %s, %s, 'amd64', 'linux')",
        [ghost.agent_id, real.resource_id, token_digest(uuid.uuid4())],
    )
    await svc.report_boundary_logs(request(str(sid), [blog(1)]))
    [s] = await sessions(db)
    assert s["workspace_agent_id"] == ghost.agent_id
    assert svc.ensured == {sid}
    assert [r["sequence_number"] for r in await logs(db)] == [0, 1]


async def test_failed_log_insert_is_logged_only(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    real = await seed_agent(db)
    orphan = attrs.evolve(real, owner_id=uuid.uuid4())  # owner FK fails for both session and logs
    svc = boundary.build(make_scope(db, orphan, cached=False))
    caplog.set_level(logging.ERROR, logger="agentd.boundary")
    resp = await svc.report_boundary_logs(request(str(uuid.uuid4()), [blog(0), blog(1)]))
    assert resp == agent_pb2.ReportBoundaryLogsResponse()
    assert await logs(db) == []
    assert any("insert 2 boundary logs" in r.getMessage() for r in caplog.records)


async def test_owner_comes_from_the_workspace_never_the_request(db: Database) -> None:
    """A claimed prebuild: the connection's cached workspace has the new owner."""
    ident = await seed_agent(db)
    _, new_owner = await seed_org_user(db, "claimer")
    scope = make_scope(db, ident)
    scope.cache.value = attrs.evolve(workspace_identity(ident), owner_id=new_owner)
    svc = boundary.build(scope)
    await svc.report_boundary_logs(request(str(uuid.uuid4()), [blog(0)]))
    [s] = await sessions(db)
    assert s["owner_id"] == new_owner
    assert [r["owner_id"] for r in await logs(db)] == [new_owner]


async def test_without_a_tracker_nothing_is_tracked(db: Database) -> None:
    svc = boundary.build(make_scope(db, await seed_agent(db), components=Components()))
    await svc.report_boundary_logs(request(str(uuid.uuid4()), [blog(0)]))
    assert len(await logs(db)) == 1


@pytest.mark.parametrize(
    ("t", "nanos", "text"),
    [
        (T0, None, "2026-11-26T12:00:00Z"),
        (T0 + dt.timedelta(microseconds=120), None, "2026-11-26T12:00:00.00012Z"),
        (T0, 123456789, "2026-11-26T12:00:00.123456789Z"),
        (T0, 100, "2026-11-26T12:00:00.0000001Z"),
        (T0.astimezone(dt.timezone(dt.timedelta(hours=2))), None, "2026-11-26T12:00:00Z"),
    ],
)
def test_event_time_is_go_rfc3339nano(t: dt.datetime, nanos: int | None, text: str) -> None:
    assert boundary.rfc3339_nano(t, nanos) == text


async def test_event_time_keeps_nanoseconds_in_the_log_line(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    svc = service(db, await seed_agent(db))
    caplog.set_level(logging.INFO, logger="agentd.boundary")
    entry = blog(0)
    entry.time.seconds, entry.time.nanos = int(T0.timestamp()), 987654321
    await svc.report_boundary_logs(request("", [entry]))
    [line] = [r for r in caplog.records if r.msg.startswith("boundary_request")]
    assert line.event_time == "2026-11-26T12:00:00.987654321Z"  # type: ignore[attr-defined]
    # A plain text formatter shows the fields too (operators read these lines without a JSON handler).
    text = line.getMessage()
    assert "event_time=2026-11-26T12:00:00.987654321Z" in text
    assert "sequence_number=0" in text and "decision=" in text and "http_url=" in text


async def test_end_to_end_through_an_agent_connection(db: Database, nursery: trio.Nursery) -> None:
    ident, token = await seed(db)
    tracker = BoundaryUsageTracker(db=db, replica_id=uuid.uuid4())
    agent = await nursery.start(
        functools.partial(serve_agent, db, token, components=Components(boundary_usage=tracker))
    )
    sid = uuid.uuid4()
    await agent.client.agent.ReportBoundaryLogs(request(str(sid), [blog(0), blog(1, allowed=False)]))
    await agent.client.agent.ReportBoundaryLogs(request(str(sid), [blog(2)]))
    with pytest.raises(RpcError) as err:
        await agent.client.agent.ReportBoundaryLogs(request(str(sid), [blog(i) for i in range(1001)]))
    assert "batch size 1001 exceeds maximum of 1000" in err.value.message
    [s] = await sessions(db)
    assert (s["id"], s["workspace_agent_id"], s["owner_id"]) == (sid, ident.agent_id, ident.owner_id)
    assert [r["sequence_number"] for r in await logs(db)] == [0, 1, 2]
    await tracker.flush()
    row = await db.fetchone("SELECT allowed_requests, denied_requests FROM boundary_usage_stats")
    assert row == {"allowed_requests": 2, "denied_requests": 1}
    await agent.disconnect()
