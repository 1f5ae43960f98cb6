"""UpdateLifecycle (spec §7.5) against a real PostgreSQL: state mapping, timestamp rules, event, errors."""

from __future__ import annotations

import datetime as dt
import types
from typing import Any

import pytest
import trio
from google.protobuf import timestamp_pb2
from prometheus_client.samples import Sample

from agentd.drpc.errors import RpcError
from agentd.model import ZERO_TIME
from agentd.proto import agent_pb2
from agentd.services import lifecycle
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
    make_scope,
    owner_channel,
    round_trips,
    seed,
    token_of,
    workspace_event,
)
from tests.test_metrics import families

L = agent_pb2.Lifecycle


def ts(t: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


def request(state: int, changed_at: dt.datetime | None = T0) -> agent_pb2.UpdateLifecycleRequest:
    lc = L(state=state)  # type: ignore[arg-type]
    if changed_at is not None:
        lc.changed_at.CopyFrom(ts(changed_at))
    return agent_pb2.UpdateLifecycleRequest(lifecycle=lc)


async def agent_row(db: Database, agent_id: Any) -> dict[str, Any]:
    row = await db.fetchone(
        "SELECT lifecycle_state::text AS state, started_at, ready_at FROM workspace_agents WHERE id = %s",
        [agent_id],
    )
    assert row is not None
    return row


@pytest.fixture
async def seeded(db: Database) -> Seeded:
    return await seed(db)


def service(db: Database, seeded: Seeded, ps: PubSub | None = None, now: FakeNow | None = None) -> Any:
    return lifecycle.build(make_scope(db, seeded.main, pubsub=ps, now=now))


def test_handlers_cover_both_rpcs() -> None:
    assert set(lifecycle.LifecycleService(scope=None).handlers()) == {  # type: ignore[arg-type]
        AGENT + "UpdateLifecycle",
        AGENT + "UpdateStartup",
    }


STATES = [
    (L.CREATED, "created"),
    (L.STARTING, "starting"),
    (L.START_TIMEOUT, "start_timeout"),
    (L.START_ERROR, "start_error"),
    (L.READY, "ready"),
    (L.SHUTTING_DOWN, "shutting_down"),
    (L.SHUTDOWN_TIMEOUT, "shutdown_timeout"),
    (L.SHUTDOWN_ERROR, "shutdown_error"),
    (L.OFF, "off"),
]


async def reset(db: Database, agent_id: Any) -> None:
    await db.execute(
        "UPDATE workspace_agents SET lifecycle_state = 'created', started_at = NULL, ready_at = NULL"
        " WHERE id = %s",
        [agent_id],
    )


async def test_every_state_is_stored_and_published(db: Database, seeded: Seeded, pubsub: PubSub) -> None:
    channel = owner_channel(seeded.main)
    svc = service(db, seeded, pubsub)
    async with listen(pubsub, channel) as events:
        for state, label in STATES:
            response = await svc.update_lifecycle(request(state))
            assert response == L(state=state, changed_at=ts(T0))  # type: ignore[arg-type]
            assert (await agent_row(db, seeded.main.agent_id))["state"] == label
            assert await events.drain() == {channel: [workspace_event(seeded.main, "agt_lifecycle_update")]}
    # The other agent of the workspace is untouched.
    assert await agent_row(db, seeded.other.agent_id) == {
        "state": "created",
        "started_at": None,
        "ready_at": None,
    }


async def test_starting_sets_started_at_and_resets_ready_at(db: Database, seeded: Seeded) -> None:
    svc = service(db, seeded)
    await svc.update_lifecycle(request(L.STARTING, T0))
    await svc.update_lifecycle(request(L.READY, T0 + dt.timedelta(seconds=5)))
    row = await agent_row(db, seeded.main.agent_id)
    assert (row["started_at"], row["ready_at"]) == (T0, T0 + dt.timedelta(seconds=5))

    # A restart: started_at moves, readiness is cleared.
    restart = T0 + dt.timedelta(minutes=1)
    await svc.update_lifecycle(request(L.STARTING, restart))
    row = await agent_row(db, seeded.main.agent_id)
    assert (row["state"], row["started_at"], row["ready_at"]) == ("starting", restart, None)


async def test_terminal_start_states_fill_started_at_only_when_null(db: Database, seeded: Seeded) -> None:
    svc = service(db, seeded)
    for state in (L.READY, L.START_TIMEOUT, L.START_ERROR):
        await reset(db, seeded.main.agent_id)
        # Never reported starting: started_at is filled with changed_at too.
        await svc.update_lifecycle(request(state, T0))
        row = await agent_row(db, seeded.main.agent_id)
        assert (row["started_at"], row["ready_at"]) == (T0, T0), state
        # Reported again later: started_at stays, ready_at moves.
        later = T0 + dt.timedelta(seconds=30)
        await svc.update_lifecycle(request(state, later))
        row = await agent_row(db, seeded.main.agent_id)
        assert (row["started_at"], row["ready_at"]) == (T0, later), state


async def test_other_states_keep_both_timestamps(db: Database, seeded: Seeded) -> None:
    svc = service(db, seeded)
    await svc.update_lifecycle(request(L.STARTING, T0))
    await svc.update_lifecycle(request(L.READY, T0 + dt.timedelta(seconds=1)))
    for state in (L.CREATED, L.SHUTTING_DOWN, L.SHUTDOWN_TIMEOUT, L.SHUTDOWN_ERROR, L.OFF):
        await svc.update_lifecycle(request(state, T0 + dt.timedelta(hours=1)))
        row = await agent_row(db, seeded.main.agent_id)
        assert (row["started_at"], row["ready_at"]) == (T0, T0 + dt.timedelta(seconds=1)), state


async def test_any_transition_is_accepted(db: Database, seeded: Seeded) -> None:
    svc = service(db, seeded)
    for state in (L.OFF, L.READY, L.CREATED, L.STARTING, L.CREATED):
        await svc.update_lifecycle(request(state))
    assert (await agent_row(db, seeded.main.agent_id))["state"] == "created"


async def test_go_zero_changed_at_becomes_server_now_and_is_echoed(db: Database, seeded: Seeded) -> None:
    now = FakeNow(T0 + dt.timedelta(minutes=7))
    response = await service(db, seeded, now=now).update_lifecycle(request(L.READY, ZERO_TIME))
    assert response.changed_at.ToDatetime(tzinfo=dt.UTC) == now.value
    row = await agent_row(db, seeded.main.agent_id)
    assert (row["started_at"], row["ready_at"]) == (now.value, now.value)


async def test_absent_changed_at_is_1970_and_not_replaced(db: Database, seeded: Seeded) -> None:
    response = await service(db, seeded).update_lifecycle(request(L.READY, None))
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    assert response.changed_at.ToDatetime(tzinfo=dt.UTC) == epoch
    assert (await agent_row(db, seeded.main.agent_id))["ready_at"] == epoch


async def test_zero_time_plus_a_nanosecond_is_not_replaced(db: Database, seeded: Seeded) -> None:
    req = request(L.READY, ZERO_TIME)
    req.lifecycle.changed_at.nanos = 1000
    response = await service(db, seeded).update_lifecycle(req)
    assert response.changed_at == req.lifecycle.changed_at


async def test_unknown_state_is_an_error_and_writes_nothing(
    db: Database, seeded: Seeded, pubsub: PubSub
) -> None:
    async with listen(pubsub, owner_channel(seeded.main)) as events:
        for state, text in ((L.STATE_UNSPECIFIED, "STATE_UNSPECIFIED"), (42, "42")):
            with pytest.raises(RpcError) as err:
                await service(db, seeded, pubsub).update_lifecycle(request(state))
            assert err.value.message == f'invalid lifecycle.state: unknown lifecycle state "{text}"'
            assert err.value.code == 0
        assert await events.drain() == {}
    assert (await agent_row(db, seeded.main.agent_id))["state"] == "created"


async def test_missing_lifecycle_message_is_an_unknown_state(db: Database, seeded: Seeded) -> None:
    with pytest.raises(RpcError, match='unknown lifecycle state "STATE_UNSPECIFIED"'):
        await service(db, seeded).update_lifecycle(agent_pb2.UpdateLifecycleRequest())


async def test_out_of_range_changed_at_names_the_field(db: Database, seeded: Seeded) -> None:
    req = request(L.READY)
    req.lifecycle.changed_at.seconds = 253402300800  # 10000-01-01
    with pytest.raises(RpcError, match=r"^invalid lifecycle\.changed_at: "):
        await service(db, seeded).update_lifecycle(req)


async def test_deleted_agent_is_an_error(db: Database, seeded: Seeded, pubsub: PubSub) -> None:
    await db.execute("UPDATE workspace_agents SET deleted = true WHERE id = %s", [seeded.main.agent_id])
    async with listen(pubsub, owner_channel(seeded.main)) as events:
        with pytest.raises(RpcError) as err:
            await service(db, seeded, pubsub).update_lifecycle(request(L.READY))
        assert await events.drain() == {}
    assert err.value.message == (
        f'get workspace agent by id "{seeded.main.agent_id}": sql: no rows in result set'
    )


async def test_end_to_end_through_agentd_testing(
    db: Database, seeded: Seeded, pubsub: PubSub, nursery: trio.Nursery
) -> None:
    agent = await connect(nursery, db, token_of(seeded), events=Events(pubsub))
    channel = owner_channel(seeded.main)
    async with listen(pubsub, channel) as events:
        for state in (L.STARTING, L.READY):
            response = await agent.client.agent.UpdateLifecycle(request(state, ZERO_TIME))
            assert response.state == state
            # The server filled in its own time for Go's zero time, and said so on the wire.
            assert response.changed_at.ToDatetime(tzinfo=dt.UTC).year == dt.datetime.now(dt.UTC).year
        with pytest.raises(RpcError) as err:
            await agent.client.agent.UpdateLifecycle(request(L.STATE_UNSPECIFIED))
        assert (err.value.code, err.value.message) == (
            0,
            'invalid lifecycle.state: unknown lifecycle state "STATE_UNSPECIFIED"',
        )
        kinds = [e["kind"] for e in (await events.drain()).get(channel, [])]
    # (the connection monitor's agt_connection_update shares the channel)
    assert [k for k in kinds if k != "agt_connection_update"] == ["agt_lifecycle_update"] * 2
    row = await agent_row(db, seeded.main.agent_id)
    assert row["state"] == "ready"
    assert row["started_at"] is not None and row["ready_at"] is not None
    assert row["started_at"] <= row["ready_at"]


def test_build_duration_histogram_renders_prometheus_text() -> None:
    hist = lifecycle.BuildDurationHistogram()
    labels = {
        "template_name": 'd"ev',
        "organization_name": "acme",
        "transition": "start",
        "is_prebuild": False,
    }
    hist.observe(42.5, status="success", **labels)  # type: ignore[arg-type]
    hist.observe(5, status="success", **labels)  # type: ignore[arg-type]
    name = "coderd_template_workspace_build_duration_seconds"
    lbl = {**labels, "status": "success", "is_prebuild": "false"}
    counts = {
        "1.0": 0,
        "10.0": 1,
        "30.0": 1,
        "60.0": 2,
        "300.0": 2,
        "600.0": 2,
        "1800.0": 2,
        "3600.0": 2,
        "+Inf": 2,
    }
    text = hist.render()
    assert 'template_name="d\\"ev"' in text  # escaped
    assert families(text) == {
        name: (
            "histogram",
            "Duration from workspace build creation to agent ready, by template.",
            [
                *[Sample(f"{name}_bucket", {**lbl, "le": le}, n) for le, n in counts.items()],
                Sample(f"{name}_count", lbl, 2.0),
                Sample(f"{name}_sum", lbl, 47.5),
            ],
        )
    }


async def test_build_duration_is_observed_once_all_agents_are_ready(db: Database, seeded: Seeded) -> None:
    hist = lifecycle.BuildDurationHistogram()
    components = types.SimpleNamespace(build_durations=hist, derp_map=None)
    created = T0 - dt.timedelta(seconds=100)
    await db.execute(
        "UPDATE workspace_builds SET created_at = %s WHERE id = %s", [created, seeded.main.build_id]
    )
    main = lifecycle.build(make_scope(db, seeded.main, components=components))  # type: ignore[arg-type]
    other = lifecycle.build(make_scope(db, seeded.other, components=components))  # type: ignore[arg-type]

    # "other" is not ready yet: nothing to observe, and main's connection does not look again.
    await main.update_lifecycle(request(L.READY, T0))
    assert hist.samples() == {}
    # The last agent reaches a terminal state: duration = last ready_at - build creation, worst status.
    await other.update_lifecycle(request(L.START_ERROR, T0 + dt.timedelta(seconds=20)))
    names = await template_org(db, seeded)
    assert hist.samples() == {(*names, "start", "error", "false"): (1, 120.0)}
    # At most once per connection.
    await other.update_lifecycle(request(L.READY, T0 + dt.timedelta(seconds=30)))
    await main.update_lifecycle(request(L.READY, T0 + dt.timedelta(seconds=40)))
    assert hist.samples() == {(*names, "start", "error", "false"): (1, 120.0)}
    # A new connection of the agent checks again (now every agent is "ready": status success).
    again = lifecycle.build(make_scope(db, seeded.main, components=components))  # type: ignore[arg-type]
    await again.update_lifecycle(request(L.READY, T0 + dt.timedelta(seconds=50)))
    assert hist.samples()[(*names, "start", "success", "false")] == (1, 150.0)


async def template_org(db: Database, seeded: Seeded) -> tuple[str, str]:
    row = await db.fetchone(
        "SELECT t.name AS template, o.name AS org FROM templates t"
        " JOIN organizations o ON o.id = t.organization_id WHERE t.id = %s",
        [seeded.main.template_id],
    )
    assert row is not None
    return (row["template"], row["org"])


async def test_write_and_publish_failures_are_reported(db: Database, seeded: Seeded) -> None:
    await inject_failure(db, "workspace_agents", "UPDATE OF lifecycle_state", "NEW.lifecycle_state = 'off'")
    svc = service(db, seeded)
    with pytest.raises(RpcError, match=r"^update workspace agent lifecycle state: injected failure$"):
        await svc.update_lifecycle(request(L.OFF))
    assert (await agent_row(db, seeded.main.agent_id))["state"] == "created"

    failing = lifecycle.build(make_scope(db, seeded.main, pubsub=FailingPublisher()))
    with pytest.raises(RpcError, match=r"^publish workspace update: connection lost$"):
        await failing.update_lifecycle(request(L.STARTING))
    # The write happened before the publish failed (as in Coder).
    assert (await agent_row(db, seeded.main.agent_id))["state"] == "starting"


async def test_update_and_event_are_one_statement(db: Database, seeded: Seeded, pubsub: PubSub) -> None:
    channel = owner_channel(seeded.main)
    svc = service(db, seeded, pubsub)
    async with listen(pubsub, channel) as events:
        with round_trips() as trips:
            await svc.update_lifecycle(request(L.STARTING, T0))
        assert trips == [1]
        assert await events.drain() == {channel: [workspace_event(seeded.main, "agt_lifecycle_update")]}
        # A deleted agent: the error, and no event.
        await db.execute("UPDATE workspace_agents SET deleted = true WHERE id = %s", [seeded.main.agent_id])
        with pytest.raises(RpcError, match="no rows in result set"):
            await svc.update_lifecycle(request(L.STARTING, T0))
        assert await events.drain() == {}
