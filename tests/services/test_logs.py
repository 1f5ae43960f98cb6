"""BatchCreateLogs (spec §7.9): the sanitiser against Go's semantics, and the RPC on a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import msgspec
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.admin import Script
from agentd.drpc.errors import RpcError
from agentd.proto import agent_pb2
from agentd.services import logs
from agentd.services.base import AGENT
from agentd.services.events import Events
from agentd.store import Database
from agentd.store.pubsub import PubSub
from tests.services.core_support import (
    T0,
    FailingPublisher,
    FakeNow,
    Seeded,
    connect,
    inject_failure,
    listen,
    logs_channel,
    make_scope,
    owner_channel,
    round_trips,
    seed,
    token_of,
    workspace_event,
)

X = "\u274c"  # ❌
EXTERNAL = uuid.UUID("3b579bf4-1ed8-4b99-87a8-e9a1e3410410")
Log = agent_pb2.Log

# ---- the sanitiser -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", ""),
        (b"hello", "hello"),
        (b"a\xffb", f"a{X}b"),
        # Consecutive invalid bytes are one run: one replacement.
        (b"a\xff\xfe\xfdb", f"a{X}b"),
        # A truncated 3-byte sequence is two invalid bytes, then valid ASCII.
        (b"\xe2\x82A", f"{X}A"),
        (b"\xe2\x82\xac", "\u20ac"),
        (b"\xe2\x82\xac\xe2\x82", f"\u20ac{X}"),
        # Overlong, surrogate, beyond U+10FFFF, lone continuation, 0xF5+ leads.
        (b"\xc0\x80", X),
        (b"\xc1\xbf", X),
        (b"\xe0\x80\x80", X),
        (b"\xed\xa0\x80", X),
        (b"\xed\x9f\xbf", "\ud7ff"),
        (b"\xf0\x8f\xbf\xbf", X),
        (b"\xf4\x90\x80\x80", X),
        (b"\xf4\x8f\xbf\xbf", "\U0010ffff"),
        (b"\x80", X),
        (b"\xf5\x80\x80\x80", X),
        # A run is broken by a valid rune: two replacements.
        (b"\xff\xe2\x82\xac\xff", f"{X}\u20ac{X}"),
        # NUL bytes each become ❌, and break runs of invalid bytes.
        (b"\x00", X),
        (b"a\x00\x00b", f"a{X}{X}b"),
        (b"\xff\x00\xff", f"{X}{X}{X}"),
        # A valid U+FFFD is kept.
        (b"\xef\xbf\xbd", "\ufffd"),
    ],
)
def test_sanitize_matches_go(raw: bytes, expected: str) -> None:
    assert logs.sanitize_log_output(raw) == expected


def test_sanitize_str_input() -> None:
    assert logs.sanitize_log_output("ok\x00\u20ac") == f"ok{X}\u20ac"
    # A lone surrogate is not UTF-8 (it cannot arrive through protobuf, but the sanitiser copes).
    assert logs.sanitize_log_output("a\ud800\udfffb") == f"a{X}b"


def _oracle(data: bytes) -> str:
    """Go's ToValidUTF8 + NUL replacement built on Python's strict decoder, position by position."""
    out: list[str] = []
    i = 0
    in_run = False
    while i < len(data):
        for width in (1, 2, 3, 4):
            try:
                ch = data[i : i + width].decode("utf-8")
            except UnicodeDecodeError:
                continue
            if len(ch) == 1:
                out.append(X if ch == "\x00" else ch)
                i += width
                in_run = False
                break
        else:
            if not in_run:
                out.append(X)
            in_run = True
            i += 1
    return "".join(out)


_utf8_fragments = st.one_of(
    st.binary(max_size=6),
    st.text(max_size=4).map(lambda s: s.encode("utf-8")),
    st.sampled_from([b"\xe2\x82", b"\xf0\x9f\x98", b"\xed\xa0\x80", b"\x00", b"\xc0\xaf", b"\xf4\x90"]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_utf8_fragments, max_size=8).map(b"".join))
def test_sanitize_agrees_with_a_strict_decoder_oracle(raw: bytes) -> None:
    result = logs.sanitize_log_output(raw)
    assert result == _oracle(raw)
    assert "\x00" not in result
    result.encode("utf-8")  # valid


def test_go_quote() -> None:
    assert logs.go_quote(b"") == '""'
    assert logs.go_quote(b"\x01\x02\xff") == '"\\x01\\x02\\xff"'
    assert logs.go_quote('a"b\\c\n\t\u20ac') == '"a\\"b\\\\c\\n\\t\u20ac"'
    assert logs.go_quote("\u0085\u200b\U000e0001") == '"\\u0085\\u200b\\U000e0001"'


def test_handlers() -> None:
    assert set(logs.LogsService(scope=None).handlers()) == {AGENT + "BatchCreateLogs"}  # type: ignore[arg-type]


# ---- the RPC --------------------------------------------------------------------------------------------

NOW = T0 + dt.timedelta(hours=1)


@pytest.fixture
async def seeded(db: Database) -> Seeded:
    from tests.services.core_support import workspace_spec

    spec = workspace_spec(scripts=[{"display_name": "Install", "script": "true", "run_on_start": True}])
    main, other = spec.agents
    other = msgspec.structs.replace(other, scripts=(Script(display_name="Other", script="true"),))
    return await seed(db, msgspec.structs.replace(spec, agents=(main, other)))


async def source_of(db: Database, agent_id: uuid.UUID) -> uuid.UUID:
    value = await db.fetchval(
        "SELECT log_source_id FROM workspace_agent_scripts WHERE workspace_agent_id = %s", [agent_id]
    )
    assert isinstance(value, uuid.UUID)
    return value


async def log_rows(db: Database, agent_id: uuid.UUID) -> list[dict[str, Any]]:
    return await db.fetchall(
        "SELECT id, created_at, output, level::text AS level, log_source_id FROM workspace_agent_logs"
        " WHERE agent_id = %s ORDER BY id",
        [agent_id],
    )


async def counters(db: Database, agent_id: uuid.UUID) -> tuple[int, bool]:
    row = await db.fetchone(
        "SELECT logs_length, logs_overflowed FROM workspace_agents WHERE id = %s", [agent_id]
    )
    assert row is not None
    return row["logs_length"], row["logs_overflowed"]


def batch(source: uuid.UUID | bytes, *entries: tuple[str, int]) -> agent_pb2.BatchCreateLogsRequest:
    raw = source.bytes if isinstance(source, uuid.UUID) else source
    return agent_pb2.BatchCreateLogsRequest(
        log_source_id=raw,
        logs=[
            Log(output=text, level=level, created_at={"seconds": 1})  # type: ignore[arg-type]
            for text, level in entries
        ],
    )


def service(db: Database, seeded: Seeded, ps: PubSub | None = None) -> logs.LogsService:
    return logs.build(make_scope(db, seeded.main, pubsub=ps, now=FakeNow(NOW)))


def both_channels(pubsub: PubSub, seeded: Seeded) -> Any:
    return listen(pubsub, owner_channel(seeded.main), logs_channel(seeded.main))


async def test_logs_are_stored_with_server_time_and_events(
    db: Database, seeded: Seeded, pubsub: PubSub
) -> None:
    svc = service(db, seeded, pubsub)
    agent = seeded.main.agent_id
    source = await source_of(db, agent)

    # One subscription for the whole test (see the report: re-subscribing a channel right after
    # leaving it can race the PubSub's UNLISTEN).
    async with both_channels(pubsub, seeded) as events:
        response = await svc.batch_create_logs(
            batch(source, ("installing", Log.INFO), ("done\x00", Log.WARN))
        )
        first_events = await events.drain()
        assert response == agent_pb2.BatchCreateLogsResponse()
        rows = await log_rows(db, agent)
        assert [(r["output"], r["level"], r["created_at"], r["log_source_id"]) for r in rows] == [
            ("installing", "info", NOW, source),
            (f"done{X}", "warn", NOW, source),
        ]
        assert await counters(db, agent) == (len("installing") + len(f"done{X}".encode()), False)
        first = rows[0]["id"]
        assert first_events == {
            logs_channel(seeded.main): [{"created_after": first - 1}],
            owner_channel(seeded.main): [workspace_event(seeded.main, "agt_first_logs")],
        }

        # Later batches: only the agent-logs notification, from the new lowest id.
        await svc.batch_create_logs(batch(source, ("more", Log.DEBUG)))
        later_events = await events.drain()
        rows = await log_rows(db, agent)
        assert later_events == {logs_channel(seeded.main): [{"created_after": rows[2]["id"] - 1}]}
    assert await log_rows(db, seeded.other.agent_id) == []


async def test_levels_map_and_output_is_truncated_but_counted_in_full(db: Database, seeded: Seeded) -> None:
    svc = service(db, seeded)
    source = await source_of(db, seeded.main.agent_id)
    levels = [Log.TRACE, Log.DEBUG, Log.INFO, Log.WARN, Log.ERROR, Log.LEVEL_UNSPECIFIED, 77]
    await svc.batch_create_logs(batch(source, *[(str(i), level) for i, level in enumerate(levels)]))
    rows = await log_rows(db, seeded.main.agent_id)
    assert [r["level"] for r in rows] == ["trace", "debug", "info", "warn", "error", "info", "info"]

    text = "\u20ac" * 1500  # 1500 characters, 4500 bytes
    await svc.batch_create_logs(batch(source, (text, Log.INFO)))
    rows = await log_rows(db, seeded.main.agent_id)
    assert rows[-1]["output"] == "\u20ac" * 1024
    assert await counters(db, seeded.main.agent_id) == (len(levels) + 4500, False)


async def test_log_source_ids(db: Database, seeded: Seeded, pubsub: PubSub) -> None:
    svc = service(db, seeded, pubsub)
    agent = seeded.main.agent_id
    async with both_channels(pubsub, seeded) as events:
        # An empty batch is answered before the source id is even looked at.
        assert await svc.batch_create_logs(batch(b"bad")) == agent_pb2.BatchCreateLogsResponse()

        # Not 16 bytes.
        for raw, text in [
            (b"", 'parse log source ID "": invalid UUID (got 0 bytes)'),
            (b"\x01\x02\xff", 'parse log source ID "\\x01\\x02\\xff": invalid UUID (got 3 bytes)'),
            (b"a" * 17, f'parse log source ID "{"a" * 17}": invalid UUID (got 17 bytes)'),
        ]:
            with pytest.raises(RpcError) as err:
                await svc.batch_create_logs(batch(raw, ("x", Log.INFO)))
            assert err.value.message == text

        # Another agent's source: refused, nothing written anywhere.
        foreign = await source_of(db, seeded.other.agent_id)
        with pytest.raises(RpcError) as err:
            await svc.batch_create_logs(batch(foreign, ("x", Log.INFO)))
        assert err.value.message == f'invalid log_source_id: log source "{foreign}" belongs to another agent'
        assert await log_rows(db, agent) == []
        assert await log_rows(db, seeded.other.agent_id) == []
        assert await counters(db, agent) == (0, False)
        assert await counters(db, seeded.other.agent_id) == (0, False)
        assert await events.drain() == {}

    # The nil id (legacy clients) creates this agent's "External" source once and logs to it.
    for _ in range(2):
        await svc.batch_create_logs(batch(uuid.UUID(int=0), ("legacy", Log.INFO)))
    sources = await db.fetchall(
        "SELECT workspace_agent_id, created_at, display_name, icon FROM workspace_agent_log_sources"
        " WHERE id = %s",
        [EXTERNAL],
    )
    assert sources == [
        {
            "workspace_agent_id": agent,
            "created_at": NOW,
            "display_name": "External",
            "icon": "/emojis/1f310.png",
        }
    ]

    # The External id itself is shared by all agents: another agent may send it directly.
    other = logs.build(make_scope(db, seeded.other, now=FakeNow(NOW)))
    await other.batch_create_logs(batch(EXTERNAL, ("external", Log.INFO)))

    # An id no agent has is accepted as-is (there is no foreign key).
    unknown = uuid.uuid4()
    await svc.batch_create_logs(batch(unknown, ("unknown", Log.INFO)))

    assert [(r["output"], r["log_source_id"]) for r in await log_rows(db, agent)] == [
        ("legacy", EXTERNAL),
        ("legacy", EXTERNAL),
        ("unknown", unknown),
    ]
    assert [(r["output"], r["log_source_id"]) for r in await log_rows(db, seeded.other.agent_id)] == [
        ("external", EXTERNAL)
    ]


async def test_overflow_marks_the_agent_and_tells_it_to_stop(
    db: Database, seeded: Seeded, pubsub: PubSub
) -> None:
    svc = service(db, seeded, pubsub)
    agent = seeded.main.agent_id
    source = await source_of(db, agent)
    await db.execute("UPDATE workspace_agents SET logs_length = %s WHERE id = %s", [1_048_576 - 5, agent])

    async with both_channels(pubsub, seeded) as events:
        # Exactly up to the limit is fine ...
        response = await svc.batch_create_logs(batch(source, ("12345", Log.INFO)))
        assert response == agent_pb2.BatchCreateLogsResponse()
        assert await counters(db, agent) == (1_048_576, False)
        # (logs_length was not 0 before: no first-logs event)
        assert list(await events.drain()) == [logs_channel(seeded.main)]

        # ... one more byte is not: nothing stored, the agent is marked, the UI is told.
        response = await svc.batch_create_logs(batch(source, ("x", Log.INFO)))
        assert response == agent_pb2.BatchCreateLogsResponse(log_limit_exceeded=True)
        assert await counters(db, agent) == (1_048_576, True)
        assert [r["output"] for r in await log_rows(db, agent)] == ["12345"]
        assert await events.drain() == {
            owner_channel(seeded.main): [workspace_event(seeded.main, "agt_logs_overflow")]
        }

        # From now on every call answers at once, empty or not, without events.
        for req in (batch(source, ("y", Log.INFO)), batch(b"")):
            assert await svc.batch_create_logs(req) == agent_pb2.BatchCreateLogsResponse(
                log_limit_exceeded=True
            )
        assert await events.drain() == {}


async def test_a_batch_larger_than_the_budget_overflows(db: Database, seeded: Seeded, pubsub: PubSub) -> None:
    source = await source_of(db, seeded.main.agent_id)
    big = ("a" * 700_000, Log.INFO)
    async with both_channels(pubsub, seeded) as events:
        response = await service(db, seeded, pubsub).batch_create_logs(batch(source, big, big))
        assert await events.drain() == {
            owner_channel(seeded.main): [workspace_event(seeded.main, "agt_logs_overflow")]
        }
    assert response.log_limit_exceeded
    assert await counters(db, seeded.main.agent_id) == (0, True)
    assert await log_rows(db, seeded.main.agent_id) == []


async def test_deleted_agent_is_an_error(db: Database, seeded: Seeded) -> None:
    await db.execute("UPDATE workspace_agents SET deleted = true WHERE id = %s", [seeded.main.agent_id])
    with pytest.raises(RpcError) as err:
        await service(db, seeded).batch_create_logs(batch(uuid.uuid4(), ("x", Log.INFO)))
    assert (
        err.value.message == f'get workspace agent by id "{seeded.main.agent_id}": sql: no rows in result set'
    )


async def test_end_to_end_logs_and_the_limit(
    db: Database, seeded: Seeded, pubsub: PubSub, nursery: trio.Nursery
) -> None:
    agent = await connect(nursery, db, token_of(seeded), events=Events(pubsub))
    agent_id = seeded.main.agent_id
    async with both_channels(pubsub, seeded) as events:
        response = await agent.client.agent.BatchCreateLogs(batch(uuid.UUID(int=0), ("a\x00b", Log.ERROR)))
        assert response == agent_pb2.BatchCreateLogsResponse()
        rows = await log_rows(db, agent_id)
        assert [(r["output"], r["level"], r["log_source_id"]) for r in rows] == [
            (f"a{X}b", "error", EXTERNAL)
        ]
        received = await events.drain()
        assert received[logs_channel(seeded.main)] == [{"created_after": rows[0]["id"] - 1}]
        kinds = [
            e["kind"] for e in received[owner_channel(seeded.main)] if e["kind"] != "agt_connection_update"
        ]
        assert kinds == ["agt_first_logs"]

        with pytest.raises(RpcError) as err:
            await agent.client.agent.BatchCreateLogs(batch(b"\x00", ("x", Log.INFO)))
        assert (err.value.code, err.value.message) == (
            0,
            'parse log source ID "\\x00": invalid UUID (got 1 bytes)',
        )

        await db.execute("UPDATE workspace_agents SET logs_length = 1048576 WHERE id = %s", [agent_id])
        for _ in range(2):  # once by the check constraint, then at once from logs_overflowed
            response = await agent.client.agent.BatchCreateLogs(batch(uuid.UUID(int=0), ("more", Log.INFO)))
            assert response == agent_pb2.BatchCreateLogsResponse(log_limit_exceeded=True)
    assert await counters(db, agent_id) == (1048576, True)


async def test_database_failures(db: Database, seeded: Seeded) -> None:
    svc = service(db, seeded)
    agent = seeded.main.agent_id
    source = await source_of(db, agent)

    await inject_failure(db, "workspace_agent_log_sources", "INSERT")
    with pytest.raises(RpcError, match=r"^insert external workspace agent log source: injected failure$"):
        await svc.batch_create_logs(batch(uuid.UUID(int=0), ("x", Log.INFO)))

    await inject_failure(db, "workspace_agent_logs", "INSERT", "NEW.output = 'boom'")
    with pytest.raises(RpcError, match=r"^insert workspace agent logs: injected failure$"):
        await svc.batch_create_logs(batch(source, ("fine", Log.INFO), ("boom", Log.INFO)))
    # One statement: the length update went with the failed insert.
    assert await counters(db, agent) == (0, False)
    assert await log_rows(db, agent) == []

    # Marking the overflow is only a hint: its failure still answers log_limit_exceeded.
    await inject_failure(db, "workspace_agents", "UPDATE OF logs_overflowed")
    await db.execute("UPDATE workspace_agents SET logs_length = 1048576 WHERE id = %s", [agent])
    response = await svc.batch_create_logs(batch(source, ("x", Log.INFO)))
    assert response == agent_pb2.BatchCreateLogsResponse(log_limit_exceeded=True)
    assert await counters(db, agent) == (1048576, False)


async def test_publish_failures(db: Database, seeded: Seeded) -> None:
    failing = logs.build(make_scope(db, seeded.main, pubsub=FailingPublisher(), now=FakeNow(NOW)))
    source = await source_of(db, seeded.main.agent_id)
    # First logs: the rows are in, the agent-logs notification failure is only logged, the
    # workspace event failure is the call's error.
    with pytest.raises(RpcError, match=r"^publish workspace update: connection lost$"):
        await failing.batch_create_logs(batch(source, ("a", Log.INFO)))
    assert [r["output"] for r in await log_rows(db, seeded.main.agent_id)] == ["a"]
    # Later logs publish only to agent-logs, whose failure does not fail the call.
    assert (
        await failing.batch_create_logs(batch(source, ("b", Log.INFO))) == agent_pb2.BatchCreateLogsResponse()
    )
    # Overflow: the workspace event failure is the error (the agent is still marked).
    await db.execute(
        "UPDATE workspace_agents SET logs_length = 1048576 WHERE id = %s", [seeded.main.agent_id]
    )
    with pytest.raises(RpcError, match=r"^publish workspace update: connection lost$"):
        await failing.batch_create_logs(batch(source, ("c", Log.INFO)))
    assert await counters(db, seeded.main.agent_id) == (1048576, True)


async def test_a_batch_is_one_statement_with_its_events(db: Database, seeded: Seeded, pubsub: PubSub) -> None:
    svc = service(db, seeded, pubsub)
    agent = seeded.main.agent_id
    source = await source_of(db, agent)
    async with both_channels(pubsub, seeded) as events:
        with round_trips() as trips:
            await svc.batch_create_logs(batch(source, ("one", Log.INFO)))
        assert trips == [1]
        first = (await log_rows(db, agent))[0]["id"]
        assert await events.drain() == {
            logs_channel(seeded.main): [{"created_after": first - 1}],
            owner_channel(seeded.main): [workspace_event(seeded.main, "agt_first_logs")],
        }
        # Overflowed: still one statement, nothing written or published.
        await db.execute("UPDATE workspace_agents SET logs_overflowed = true WHERE id = %s", [agent])
        with round_trips() as trips:
            response = await svc.batch_create_logs(batch(source, ("two", Log.INFO)))
        assert trips == [1]
        assert response == agent_pb2.BatchCreateLogsResponse(log_limit_exceeded=True)
        assert [r["output"] for r in await log_rows(db, agent)] == ["one"]
        assert await events.drain() == {}


async def test_a_batch_cancelled_mid_statement_leaves_nothing(
    db: Database, seeded: Seeded, pubsub: PubSub
) -> None:
    svc = service(db, seeded, pubsub)
    agent = seeded.main.agent_id
    source = await source_of(db, agent)
    before = await counters(db, agent)
    async with both_channels(pubsub, seeded) as events:
        async with db.transaction() as tx:
            # Hold the agent row: the statement blocks on it after reading, before writing anything.
            await tx.execute("SELECT 1 FROM workspace_agents WHERE id = %s FOR UPDATE", [agent])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(svc.batch_create_logs, batch(source, ("lost", Log.INFO)))
                while not await db.fetchval(  # noqa: ASYNC110 - polling the server, not a trio state
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                    ["%INSERT INTO workspace_agent_logs%"],
                ):
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            # The cancel request reaches the server from the pool's background nursery; release the
            # lock only once it has stopped the statement (if it never does, this times out).
            with trio.fail_after(10):
                while await db.fetchval(  # noqa: ASYNC110 - polling the server, not a trio state
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                    ["%INSERT INTO workspace_agent_logs%"],
                ):
                    await trio.sleep(0.01)
        assert await log_rows(db, agent) == []
        assert await counters(db, agent) == before
        assert await events.drain() == {}
