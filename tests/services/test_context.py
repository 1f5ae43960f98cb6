"""PushContextState (spec §7.19): every cap, version gating, the repeatable-read transaction and its retry."""

from __future__ import annotations

import base64
import logging

import pytest
import trio
from google.protobuf import struct_pb2

from agentd.drpc.errors import RpcError
from agentd.proto import agent_pb2
from agentd.services import context
from agentd.services.context import INT64_MAX, body_json, validate
from agentd.store import Database
from agentd.store.context_state import fetch_context_resources, fetch_context_snapshot
from agentd.testing import serve_agent
from tests.services.audit_support import T0, FakeNow, make_scope, seed, seed_agent

Res = agent_pb2.ContextResource


def instruction(source: str, content: bytes = b"# rules", **kw: object) -> Res:
    kw.setdefault("status", Res.OK)
    r = Res(source=source, **kw)  # type: ignore[arg-type]
    r.instruction_file.content = content
    return r


def push(
    version: int,
    resources: list[Res],
    *,
    initial: bool = False,
    aggregate_hash: bytes = b"\x01" * 32,
    snapshot_error: str = "",
) -> agent_pb2.PushContextStateRequest:
    return agent_pb2.PushContextStateRequest(
        version=version,
        aggregate_hash=aggregate_hash,
        resources=resources,
        initial=initial,
        snapshot_error=snapshot_error,
    )


# --------------------------------------------------------------------------------------------------
# Caps (pure)
# --------------------------------------------------------------------------------------------------


def no_body(source: str) -> Res:
    return Res(source=source, status=Res.OK)


BIG = 256 * 1024


@pytest.mark.parametrize(
    ("req", "text"),
    [
        (push(INT64_MAX + 1, []), "invalid version: 9223372036854775808 exceeds maximum"),
        (push(1, [], aggregate_hash=b"x" * 65), "invalid aggregate_hash: 65 bytes exceeds maximum of 64"),
        (
            push(1, [], snapshot_error="é" * 2049),
            "invalid snapshot_error: 4098 bytes exceeds maximum of 4096",
        ),
        (
            push(1, [instruction(f"s{i}") for i in range(1001)]),
            "invalid resources: 1001 resources exceeds maximum",
        ),
        (push(1, [instruction("")]), "invalid resources[0].source: must not be empty"),
        (push(1, [instruction("a"), instruction("x" * 1025)]), "invalid resources[1].source: 1025 bytes"),
        (push(1, [instruction("a"), instruction("a")]), "invalid resources[1].source: duplicate source 'a'"),
        (push(1, [instruction("a", source_path="p" * 1025)]), "invalid resources[0].source_path: 1025 bytes"),
        (push(1, [instruction("a", error="e" * 4097)]), "invalid resources[0].error: 4097 bytes"),
        (push(1, [instruction("a", content_hash=b"h" * 65)]), "invalid resources[0].content_hash: 65 bytes"),
        (push(1, [instruction("a", size_bytes=INT64_MAX + 1)]), "invalid resources[0].size_bytes"),
        (push(1, [no_body("a")]), "invalid resources[0].body: no body set"),
        (push(1, [instruction("a", status=Res.STATUS_UNSPECIFIED)]), "invalid resources[0].status"),
        (push(1, [instruction("a", status=99)]), "invalid resources[0].status"),
        (push(1, [instruction("a", content=b"x" * BIG)]), "invalid resources[0].body:"),
        (
            push(1, [instruction(f"f{i}", content=b"x" * (BIG * 3 // 4 - 100)) for i in range(17)]),
            "invalid resources: total body size exceeds maximum of 4194304 bytes",
        ),
    ],
)
def test_each_cap_names_its_field(req: agent_pb2.PushContextStateRequest, text: str) -> None:
    with pytest.raises(RpcError) as err:
        validate(req)
    assert text in err.value.message
    assert err.value.code == 0


def test_values_at_the_caps_are_accepted() -> None:
    rows = validate(
        push(
            INT64_MAX,
            [
                instruction(
                    "x" * 1024,
                    source_path="p" * 1024,
                    error="e" * 4096,
                    content_hash=b"h" * 64,
                    size_bytes=INT64_MAX,
                    content=b"x" * (BIG * 3 // 4 - 100),
                )
            ],
            aggregate_hash=b"a" * 64,
            snapshot_error="s" * 4096,
        )
    )
    assert len(rows) == 1 and rows[0].size_bytes == INT64_MAX


def test_bodies_are_protojson_with_proto_field_names() -> None:
    skill = Res(source="skill", status=Res.OK)
    skill.skill.name = "deploy"
    skill.skill.meta = b"\x00\xff"
    server = Res(source="mcp", status=Res.OK)
    server.mcp_server.server_name = "github"
    tool = server.mcp_server.tools.add(name="search")
    schema = struct_pb2.Struct()
    schema.update({"type": "object"})
    tool.input_schema.CopyFrom(schema)
    config = Res(source="cfg", status=Res.INVALID)
    config.mcp_config.SetInParent()
    assert body_json(skill, "skill") == '{"meta":"AP8=","name":"deploy"}'
    assert base64.b64decode("AP8=") == b"\x00\xff"
    assert body_json(server, "mcp_server") == (
        '{"server_name":"github","tools":[{"name":"search","input_schema":{"type":"object"}}]}'
    )
    assert body_json(config, "mcp_config") == "{}"
    assert [r.body_kind for r in validate(push(1, [skill, server, config]))] == [
        "skill",
        "mcp_server",
        "mcp_config",
    ]


# --------------------------------------------------------------------------------------------------
# Service on PostgreSQL
# --------------------------------------------------------------------------------------------------


async def test_handler_path(db: Database) -> None:
    svc = context.build(make_scope(db, await seed_agent(db)))
    assert set(svc.handlers()) == {"/coder.agent.v2.Agent/PushContextState"}


async def test_push_stores_snapshot_and_resources(db: Database) -> None:
    ident = await seed_agent(db)
    now = FakeNow()
    svc = context.build(make_scope(db, ident, now=now))
    skill = Res(source="~/.skills/deploy", status=Res.OVERSIZE, size_bytes=99, content_hash=b"\x02" * 32)
    skill.skill.name = "deploy"
    resp = await svc.push_context_state(
        push(
            7,
            [
                instruction("AGENTS.md", source_path="/home/coder/AGENTS.md", error="", content_hash=b"\x03"),
                skill,
            ],
            snapshot_error="partial",
        )
    )
    assert resp.accepted is True
    snap = await fetch_context_snapshot(db, ident.agent_id)
    assert snap is not None
    assert (snap.version, snap.aggregate_hash, snap.snapshot_error, snap.received_at) == (
        7,
        b"\x01" * 32,
        "partial",
        T0,
    )
    agents_md, deploy = await fetch_context_resources(db, ident.agent_id)
    assert agents_md["source"] == "AGENTS.md"
    assert agents_md["source_path"] == "/home/coder/AGENTS.md"
    assert agents_md["body_kind"] == "instruction_file"
    assert agents_md["body"] == {"content": base64.b64encode(b"# rules").decode()}
    assert (agents_md["status"], bytes(agents_md["content_hash"])) == ("ok", b"\x03")
    assert (deploy["body_kind"], deploy["status"], deploy["size_bytes"]) == ("skill", "oversize", 99)
    assert deploy["body"] == {"name": "deploy"}
    assert deploy["created_at"] == deploy["updated_at"] == T0


async def test_replays_and_older_versions_are_not_accepted(db: Database) -> None:
    ident = await seed_agent(db)
    now = FakeNow()
    svc = context.build(make_scope(db, ident, now=now))
    assert (await svc.push_context_state(push(5, [instruction("a")]))).accepted
    now.advance(seconds=30)
    assert not (await svc.push_context_state(push(5, [instruction("b")]))).accepted
    assert not (await svc.push_context_state(push(4, []))).accepted
    snap = await fetch_context_snapshot(db, ident.agent_id)
    assert snap is not None and (snap.version, snap.received_at) == (5, T0)
    assert [r["source"] for r in await fetch_context_resources(db, ident.agent_id)] == ["a"]
    # An agent that restarted starts over with initial=true: a lower version is accepted then.
    assert (await svc.push_context_state(push(1, [instruction("c")], initial=True))).accepted
    snap = await fetch_context_snapshot(db, ident.agent_id)
    assert snap is not None and snap.version == 1
    assert [r["source"] for r in await fetch_context_resources(db, ident.agent_id)] == ["c"]


async def test_first_push_need_not_be_initial(db: Database) -> None:
    ident = await seed_agent(db)
    svc = context.build(make_scope(db, ident))
    assert (await svc.push_context_state(push(0, []))).accepted


async def test_stale_resources_are_deleted_and_changed_ones_updated(db: Database) -> None:
    ident = await seed_agent(db)
    other = await seed_agent(db)
    now = FakeNow()
    svc = context.build(make_scope(db, ident, now=now))
    await context.build(make_scope(db, other, now=now)).push_context_state(push(1, [instruction("a")]))
    await svc.push_context_state(push(1, [instruction("a"), instruction("b"), instruction("c")]))
    now.advance(minutes=1)
    await svc.push_context_state(push(2, [instruction("b", content=b"new"), instruction("d")]))
    got = {r["source"]: r for r in await fetch_context_resources(db, ident.agent_id)}
    assert sorted(got) == ["b", "d"]
    assert got["b"]["body"] == {"content": base64.b64encode(b"new").decode()}
    assert (got["b"]["created_at"], got["b"]["updated_at"]) == (T0, now())
    await svc.push_context_state(push(3, []))
    assert await fetch_context_resources(db, ident.agent_id) == []
    # Another agent's resources are never touched.
    assert [r["source"] for r in await fetch_context_resources(db, other.agent_id)] == ["a"]


async def test_invalid_push_writes_nothing(db: Database) -> None:
    ident = await seed_agent(db)
    svc = context.build(make_scope(db, ident))
    with pytest.raises(RpcError):
        await svc.push_context_state(push(1, [instruction("a"), no_body("b")]))
    assert await fetch_context_snapshot(db, ident.agent_id) is None
    assert await fetch_context_resources(db, ident.agent_id) == []


async def wait_for_a_lock_waiter(db: Database) -> None:
    """Until a session of this test's database waits for a lock (polls pg_stat_activity)."""
    with trio.fail_after(10):
        while not await db.fetchval(  # noqa: ASYNC110 - polling the server, not a trio state
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ):
            await trio.sleep(0.01)


async def test_serialization_failure_is_retried(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    """A concurrent writer commits a newer version while the push is in its transaction: the push fails to
    serialize, retries, and is then judged against the committed version."""
    ident = await seed_agent(db)
    svc = context.build(make_scope(db, ident))
    await svc.push_context_state(push(1, [instruction("a")]))
    caplog.set_level(logging.DEBUG, logger="agentd.store.context_state")
    results: list[bool] = []

    async def pushing(version: int) -> None:
        results.append((await svc.push_context_state(push(version, [instruction("z")]))).accepted)

    async with trio.open_nursery() as nursery, db.transaction() as tx:
        await tx.execute(
            "UPDATE workspace_agent_context_snapshots SET version = 10 WHERE workspace_agent_id = %s",
            [ident.agent_id],
        )
        nursery.start_soon(pushing, 11)
        await wait_for_a_lock_waiter(db)  # the push has read version 1 and now waits for the row lock
        # commit: the push's upsert cannot serialize and is retried
    assert results == [True]
    snap = await fetch_context_snapshot(db, ident.agent_id)
    assert snap is not None and snap.version == 11
    assert any("serialization failure, retry 1" in r.getMessage() for r in caplog.records)


async def test_concurrent_pushes_end_at_the_highest_version(db: Database) -> None:
    ident = await seed_agent(db)
    svcs = [context.build(make_scope(db, ident)) for _ in range(4)]
    results: dict[int, bool] = {}

    async def one(i: int) -> None:
        results[i] = (await svcs[i].push_context_state(push(i + 1, [instruction(f"r{i}")]))).accepted

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(one, i)
    snap = await fetch_context_snapshot(db, ident.agent_id)
    assert snap is not None and snap.version == 4
    assert results[3] is True
    assert [r["source"] for r in await fetch_context_resources(db, ident.agent_id)] == ["r3"]


async def test_end_to_end_through_an_agent_connection(db: Database, nursery: trio.Nursery) -> None:
    ident, token = await seed(db)
    agent = await nursery.start(serve_agent, db, token)
    resp = await agent.client.agent.PushContextState(push(1, [instruction("AGENTS.md")], initial=True))
    assert resp.accepted is True
    resp = await agent.client.agent.PushContextState(push(1, [instruction("other")]))
    assert resp.accepted is False
    with pytest.raises(RpcError) as err:
        await agent.client.agent.PushContextState(push(2, [no_body("x")]))
    assert err.value.code == 0 and "resources[0].body" in err.value.message
    assert [r["source"] for r in await fetch_context_resources(db, ident.agent_id)] == ["AGENTS.md"]
    await agent.disconnect()
