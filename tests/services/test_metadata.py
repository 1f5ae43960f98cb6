"""BatchUpdateMetadata (spec §7.8): trimming, limits with their stored error texts, the key budget,
server time, ownership, and the batcher/NOTIFY path on a real PostgreSQL."""

from __future__ import annotations

import base64
import datetime as dt
import functools
import uuid
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing

import agentd.testing
from agentd.admin import create_workspace, validate_workspace_spec
from agentd.batchers.metadata import MetadataBatcher
from agentd.channels import METADATA_BATCH_CHANNEL
from agentd.components import Components
from agentd.drpc.errors import RpcError
from agentd.model import AgentIdentity
from agentd.proto import agent_pb2
from agentd.services.events import Events
from agentd.services.metadata import MetadataService, build
from agentd.store import Database, PubSub
from agentd.store.metadata import MetadataRow, metadata_rows
from agentd.store.sessions import authenticate_agent
from agentd.testing import serve_agent
from tests.services.audit_support import T0, FakeNow, make_scope

Metadata = agent_pb2.Metadata
Result = agent_pb2.WorkspaceAgentMetadata.Result


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Autojump only after real idleness, so database round trips never look like idle time."""
    return agentd.testing.virtual_clock(0.2)


async def seed_with_metadata(
    db: Database, keys: list[str], *, agents: tuple[str, ...] = ("main",)
) -> list[tuple[AgentIdentity, uuid.UUID]]:
    """One workspace whose agents each have metadata rows for ``keys`` (as the provisioner creates them)."""
    tag = uuid.uuid4().hex[:10]
    spec = validate_workspace_spec(
        {
            "name": "dev",
            "owner": {"username": f"u-{tag}", "email": f"{tag}@example.com"},
            "agents": [
                {
                    "name": name,
                    "metadata": [{"key": k, "display_name": k, "script": f"echo {k}"} for k in keys],
                }
                for name in agents
            ],
        }
    )
    created = await create_workspace(db, spec)
    out = []
    for agent in created.agents:
        ident = await authenticate_agent(db, agent.token)
        assert ident is not None
        out.append((ident, agent.token))
    return out


def md(key: str, value: str = "", error: str = "", *, collected_at: dt.datetime | None = None) -> Metadata:
    m = Metadata(key=key, result=Result(value=value, error=error))
    m.result.collected_at.FromDatetime(collected_at or dt.datetime(2001, 1, 1, tzinfo=dt.UTC))
    return m


def request(*items: Metadata) -> agent_pb2.BatchUpdateMetadataRequest:
    return agent_pb2.BatchUpdateMetadataRequest(metadata=list(items))


def service(db: Database, ident: AgentIdentity, batcher: Any = None, now: Any = None) -> MetadataService:
    scope = make_scope(db, ident, components=Components(metadata_batcher=batcher), now=now or FakeNow())
    return build(scope)


async def rows(db: Database, ident: AgentIdentity) -> dict[str, MetadataRow]:
    return await metadata_rows(db, ident.agent_id)


async def test_values_are_trimmed_and_stamped_with_server_time(db: Database) -> None:
    [(ident, _)] = await seed_with_metadata(db, ["cpu", "mem"])
    svc = service(db, ident)
    agent_time = T0 - dt.timedelta(days=3)
    response = await svc.batch_update_metadata(
        request(md("cpu", "  42%\n", collected_at=agent_time), md("mem", "", " \toops \n"))
    )
    assert response == agent_pb2.BatchUpdateMetadataResponse()
    got = await rows(db, ident)
    assert got["cpu"] == MetadataRow("cpu", "42%", "", T0)
    assert got["mem"] == MetadataRow("mem", "", "oops", T0)


async def test_value_over_2048_bytes_is_cut_and_the_error_says_so(db: Database) -> None:
    [(ident, _)] = await seed_with_metadata(db, ["big"])
    await service(db, ident).batch_update_metadata(request(md("big", "x" * 3000, "ignored")))
    row = (await rows(db, ident))["big"]
    assert row.value == "x" * 2048
    assert row.error == "value of 3000 bytes exceeded 2048 bytes"


async def test_value_limit_counts_utf8_bytes_and_never_splits_a_character(db: Database) -> None:
    [(ident, _)] = await seed_with_metadata(db, ["big"])
    await service(db, ident).batch_update_metadata(request(md("big", "é" * 1500)))  # 3000 bytes
    row = (await rows(db, ident))["big"]
    assert row.value == "é" * 1024
    assert row.error == "value of 3000 bytes exceeded 2048 bytes"


async def test_error_over_2048_bytes_is_replaced(db: Database) -> None:
    [(ident, _)] = await seed_with_metadata(db, ["e"])
    await service(db, ident).batch_update_metadata(request(md("e", "v", "y" * 2049)))
    row = (await rows(db, ident))["e"]
    assert (row.value, row.error) == ("v", "error of 2049 bytes exceeded 2048 bytes")


async def test_both_over_the_limit_keep_the_error_text(db: Database) -> None:
    [(ident, _)] = await seed_with_metadata(db, ["e"])
    await service(db, ident).batch_update_metadata(request(md("e", "v" * 2100, "y" * 2200)))
    row = (await rows(db, ident))["e"]
    assert (row.value, row.error) == ("v" * 2048, "error of 2200 bytes exceeded 2048 bytes")


async def test_exactly_2048_bytes_is_accepted(db: Database) -> None:
    [(ident, _)] = await seed_with_metadata(db, ["e"])
    await service(db, ident).batch_update_metadata(request(md("e", "v" * 2048, "y" * 2048)))
    row = (await rows(db, ident))["e"]
    assert (row.value, row.error) == ("v" * 2048, "y" * 2048)


async def test_key_budget_applies_the_accepted_part_then_fails(db: Database) -> None:
    keys = [f"{i:03d}" + "k" * 120 for i in range(60)]  # 123 bytes each: 49 fit in 6144, the 50th passes
    [(ident, _)] = await seed_with_metadata(db, keys)
    with pytest.raises(RpcError) as err:
        await service(db, ident).batch_update_metadata(request(*(md(k, f"v{i}") for i, k in enumerate(keys))))
    assert err.value.message == f"metadata keys of {50 * 123} bytes exceeded 6144 bytes"
    got = await rows(db, ident)
    assert [k for k in keys if got[k].value] == keys[:49]
    assert all(got[k].collected_at == dt.datetime(1, 1, 1, tzinfo=dt.UTC) for k in keys[49:])


async def test_key_budget_of_exactly_6144_bytes_is_fine(db: Database) -> None:
    keys = [f"{i:02d}" + "k" * 94 for i in range(64)]  # 64 * 96 = 6144
    [(ident, _)] = await seed_with_metadata(db, keys)
    await service(db, ident).batch_update_metadata(request(*(md(k, "v") for k in keys)))
    assert all(r.value == "v" for r in (await rows(db, ident)).values())


async def test_missing_result_names_the_field_and_applies_nothing(db: Database) -> None:
    [(ident, _)] = await seed_with_metadata(db, ["a", "b"])
    with pytest.raises(RpcError) as err:
        await service(db, ident).batch_update_metadata(request(md("a", "1"), Metadata(key="b")))
    assert "metadata[1].result" in err.value.message
    assert (await rows(db, ident))["a"].value == ""


async def test_unknown_keys_are_ignored(db: Database) -> None:
    [(ident, _)] = await seed_with_metadata(db, ["a"])
    await service(db, ident).batch_update_metadata(request(md("nope", "1"), md("a", "2")))
    got = await rows(db, ident)
    assert list(got) == ["a"] and got["a"].value == "2"


async def test_nul_bytes_do_not_fail_the_batch(db: Database) -> None:
    [(ident, _)] = await seed_with_metadata(db, ["a"])
    await service(db, ident).batch_update_metadata(request(md("a", "x\x00y", "e\x00"), md("b\x00", "z")))
    assert (await rows(db, ident))["a"] == MetadataRow("a", "xy", "e", T0)


async def test_only_the_authenticated_agents_rows_change(db: Database) -> None:
    """Two agents with the same key: the update keys on the connection's agent id, never on the request."""
    (a, _), (b, _) = await seed_with_metadata(db, ["shared"], agents=("a", "b"))
    await service(db, a).batch_update_metadata(request(md("shared", "from-a")))
    assert (await rows(db, a))["shared"].value == "from-a"
    assert (await rows(db, b))["shared"].value == ""


async def test_empty_request_is_fine(db: Database) -> None:
    [(ident, _)] = await seed_with_metadata(db, ["a"])
    assert (
        await service(db, ident).batch_update_metadata(request()) == agent_pb2.BatchUpdateMetadataResponse()
    )


async def test_batched_path_writes_on_flush_and_notifies(db: Database, clock: trio.testing.MockClock) -> None:
    [(ident, _)] = await seed_with_metadata(db, ["cpu"])
    pubsub = PubSub(db)
    batcher = MetadataBatcher(db, pubsub)
    svc = service(db, ident, batcher)
    async with trio.open_nursery() as nursery:
        await nursery.start(pubsub.run)
        async with pubsub.subscribe(METADATA_BATCH_CHANNEL) as sub, trio.open_nursery() as daemon:
            await daemon.start(batcher.run)
            await svc.batch_update_metadata(request(md("cpu", "1")))
            assert (await rows(db, ident))["cpu"].value == ""  # queued, not yet written
            payload = await sub.__anext__()  # the 5 s flush
            assert (await rows(db, ident))["cpu"].value == "1"
            daemon.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    assert payload == base64.b64encode(ident.agent_id.bytes).decode().rstrip("=")


async def test_end_to_end_through_an_agent_connection(db: Database, clock: trio.testing.MockClock) -> None:
    [(ident, token)] = await seed_with_metadata(db, ["cpu", "disk"])
    pubsub = PubSub(db)
    batcher = MetadataBatcher(db, pubsub, interval=3600)
    async with trio.open_nursery() as daemon:
        await daemon.start(batcher.run)
        async with trio.open_nursery() as nursery:
            agent = await nursery.start(
                functools.partial(
                    serve_agent,
                    db,
                    token,
                    services=("metadata",),
                    events=Events(pubsub),
                    components=Components(metadata_batcher=batcher),
                )
            )
            await agent.client.agent.BatchUpdateMetadata(
                request(md("cpu", " 7% "), md("disk", "", "df failed"))
            )
            with pytest.raises(RpcError) as err:
                await agent.client.agent.BatchUpdateMetadata(request(md("k" * 6145, "x")))
            assert "metadata keys of 6145 bytes exceeded 6144 bytes" in err.value.message
            await agent.disconnect()
        daemon.cancel_scope.cancel()  # shutdown: the batcher writes what it holds
    got = await rows(db, ident)
    assert (got["cpu"].value, got["disk"].error) == ("7%", "df failed")
    assert got["cpu"].collected_at.year > 2001  # the server's clock, not the agent's timestamp


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(
    st.lists(st.tuples(st.text(max_size=300), st.text(max_size=2100), st.text(max_size=2100)), max_size=40)
)
def test_accept_never_exceeds_the_limits(entries: list[tuple[str, str, str]]) -> None:
    """Any request: stored values and errors fit their limits, keys stop at the 6144-byte budget."""
    svc = MetadataService(agent_id=uuid.UUID(int=7), batcher=None, db=None, publisher=None, now=FakeNow())  # type: ignore[arg-type]
    accepted, total = svc.accept(request(*(md(k, v, e) for k, v, e in entries)))
    running, processed = 0, 0
    for k, _, _ in entries:
        running += len(k.encode())
        if running > 6144:
            break
        processed += 1
    assert total == running
    assert [u.key for u in accepted] == [k for k, _, _ in entries[:processed] if "\x00" not in k]
    assert sum(len(u.key.encode()) for u in accepted) <= 6144
    for u in accepted:
        assert len(u.value.encode()) <= 2048 and len(u.error.encode()) <= 2048
        assert "\x00" not in u.value + u.error + u.key
        assert u.agent_id == uuid.UUID(int=7) and u.collected_at == T0
