"""Resource monitoring (spec §7.11, §7.12): the pure OK/NOK machine and the service on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from fractions import Fraction

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.drpc.errors import RpcError
from agentd.proto import agent_pb2
from agentd.services import resources
from agentd.services.resources import (
    DEBOUNCE,
    DatapointState,
    MonitorState,
    datapoint_state,
    debounce,
    evaluate,
    next_state,
)
from agentd.store import Database
from agentd.testing import serve_agent
from tests.services.audit_support import T0, FakeNow, make_scope, seed, seed_agent

OK, NOK, UNK = DatapointState.OK, DatapointState.NOK, DatapointState.UNKNOWN
Datapoint = agent_pb2.PushResourcesMonitoringUsageRequest.Datapoint

# --------------------------------------------------------------------------------------------------
# Per-datapoint state
# --------------------------------------------------------------------------------------------------


def test_datapoint_missing_sample_is_unknown() -> None:
    assert datapoint_state(None, None, 80) is UNK


@pytest.mark.parametrize("total", [0, -1])
def test_datapoint_without_a_usable_total_is_unknown(total: int) -> None:
    assert datapoint_state(5, total, 80) is UNK


@pytest.mark.parametrize(
    ("used", "total", "threshold", "expected"),
    [
        (799, 1000, 80, OK),  # 79.9 % truncates to 79
        (800, 1000, 80, NOK),  # exactly the threshold is NOK
        (1000, 1000, 100, NOK),
        (0, 1000, 0, NOK),  # 0 < 0 is false
        (1, 3, 34, OK),  # 33.33 → 33
        (2**40, 2**41, 50, NOK),
    ],
)
def test_datapoint_percent_truncates_then_compares(
    used: int, total: int, threshold: int, expected: object
) -> None:
    assert datapoint_state(used, total, threshold) is expected


# --------------------------------------------------------------------------------------------------
# Next state
# --------------------------------------------------------------------------------------------------


def pts(spec: str) -> list[DatapointState]:
    """'o' OK, 'x' NOK, '?' UNKNOWN."""
    return [{"o": OK, "x": NOK, "?": UNK}[c] for c in spec]


@pytest.mark.parametrize("previous", list(MonitorState))
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("o" * 20, MonitorState.OK),
        ("x" * 10 + "o" * 10, MonitorState.NOK),  # 10 consecutive of 20 = 50 %
        ("o" * 10 + "x" * 10, MonitorState.NOK),
        ("xoxoooooooooooooooox", None),  # 3 NOK = 15 %: keep previous
        ("xoxoxoxooooooooooooo", MonitorState.NOK),  # 4 NOK = 20 %
        ("x" * 9 + "o" * 11, MonitorState.NOK),  # 9 consecutive = 45 %, but 45 % in total
        ("?" * 20, None),  # all unknown: keep
        ("o" * 19 + "?", None),  # one unknown keeps previous state
        ("xxx" + "?" * 17, None),  # 15 % NOK, rest unknown: keep
        ("xxxx" + "?" * 16, MonitorState.NOK),
        ("", None),  # no datapoints: keep (Coder divides by zero)
    ],
)
def test_next_state_table(previous: MonitorState, spec: str, expected: MonitorState | None) -> None:
    want = previous if expected is None else expected
    assert next_state(previous, pts(spec)) is want


def test_next_state_rounds_half_away_from_zero() -> None:
    # 8 of 41 = 19.51 % rounds to 20 %: NOK. 8 of 42 = 19.05 % rounds to 19 %: keep.
    assert next_state(MonitorState.OK, pts("xo" * 8 + "o" * 25)) is MonitorState.NOK
    assert next_state(MonitorState.OK, pts("xo" * 8 + "o" * 26)) is MonitorState.OK
    # 99 of 200 consecutive = 49.5 % rounds to 50 %.
    assert next_state(MonitorState.OK, pts("x" * 99 + "o" * 101)) is MonitorState.NOK


def reference_next_state(previous: MonitorState, states: list[DatapointState]) -> MonitorState:
    """Spec §7.12 written the obvious way, with exact rationals."""
    n = len(states)
    if n == 0:
        return previous

    def pct(k: int) -> int:
        x = Fraction(100 * k, n)
        return int(x + Fraction(1, 2))  # half away from zero for x >= 0

    run = best = 0
    for s in states:
        run = run + 1 if s is NOK else 0
        best = max(best, run)
    if pct(best) >= 50:
        return MonitorState.NOK
    if pct(states.count(NOK)) >= 20:
        return MonitorState.NOK
    if states.count(OK) == n:
        return MonitorState.OK
    return previous


state_lists = st.lists(st.sampled_from([OK, NOK, UNK]), max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(MonitorState)), state_lists)
def test_next_state_matches_the_reference(previous: MonitorState, states: list[DatapointState]) -> None:
    assert next_state(previous, states) is reference_next_state(previous, states)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(MonitorState)), state_lists)
def test_unknowns_never_flip_state(previous: MonitorState, states: list[DatapointState]) -> None:
    """Without a single NOK the state is OK only when every datapoint is OK; otherwise unchanged."""
    no_nok = [OK if s is NOK else s for s in states]
    result = next_state(previous, no_nok)
    if no_nok and all(s is OK for s in no_nok):
        assert result is MonitorState.OK
    else:
        assert result is previous


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(MonitorState)), state_lists, st.data())
def test_more_noks_never_clear_an_alert(
    previous: MonitorState, states: list[DatapointState], data: st.DataObject
) -> None:
    if not states:
        return
    i = data.draw(st.integers(0, len(states) - 1))
    worse = [*states[:i], NOK, *states[i + 1 :]]
    if next_state(previous, states) is MonitorState.NOK:
        assert next_state(previous, worse) is MonitorState.NOK


# --------------------------------------------------------------------------------------------------
# Debounce
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("previous", "new", "until", "notify"),
    [
        (MonitorState.OK, MonitorState.NOK, T0 - dt.timedelta(seconds=1), True),
        (MonitorState.OK, MonitorState.NOK, T0, False),  # now must be strictly after
        (MonitorState.OK, MonitorState.NOK, T0 + dt.timedelta(minutes=1), False),
        (MonitorState.NOK, MonitorState.NOK, T0 - dt.timedelta(days=1), False),
        (MonitorState.NOK, MonitorState.OK, T0 - dt.timedelta(days=1), False),
        (MonitorState.OK, MonitorState.OK, T0 - dt.timedelta(days=1), False),
    ],
)
def test_debounce(previous: MonitorState, new: MonitorState, until: dt.datetime, notify: bool) -> None:
    d = debounce(previous, new, T0, until)
    assert d.notify is notify
    assert d.state is new
    assert d.debounced_until == (T0 + DEBOUNCE if notify else until)


def test_evaluate_chains_the_steps() -> None:
    zero = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
    d = evaluate(MonitorState.OK, zero, [(90, 100)] * 10 + [None] * 10, 80, T0)
    assert (d.state, d.notify, d.debounced_until) == (MonitorState.NOK, True, T0 + DEBOUNCE)


# --------------------------------------------------------------------------------------------------
# Service on PostgreSQL
# --------------------------------------------------------------------------------------------------


async def add_memory_monitor(
    db: Database, agent: uuid.UUID, *, enabled: bool = True, threshold: int = 80
) -> None:
    await db.execute(
        "INSERT INTO workspace_agent_memory_resource_monitors (agent_id, enabled, threshold, created_at)"
        " VALUES (%s, %s, %s, now())",
        [agent, enabled, threshold],
    )


async def add_volume_monitor(
    db: Database, agent: uuid.UUID, path: str, *, enabled: bool = True, threshold: int = 90
) -> None:
    await db.execute(
        "INSERT INTO workspace_agent_volume_resource_monitors"
        " (agent_id, enabled, threshold, path, created_at) VALUES (%s, %s, %s, %s, now())",
        [agent, enabled, threshold, path],
    )


Sample = tuple[int, int] | None


def push(
    memory: list[Sample], volumes: dict[str, list[Sample]] | None = None
) -> agent_pb2.PushResourcesMonitoringUsageRequest:
    req = agent_pb2.PushResourcesMonitoringUsageRequest()
    for i, m in enumerate(memory):
        dp = req.datapoints.add()
        dp.collected_at.FromDatetime(T0 + dt.timedelta(seconds=10 * i))
        if m is not None:
            dp.memory.used, dp.memory.total = m
        for path, samples in (volumes or {}).items():
            s = samples[i]
            if s is not None:
                dp.volumes.add(volume=path, used=s[0], total=s[1])
    return req


async def notifications(db: Database) -> list[dict[str, object]]:
    return await db.fetchall(
        "SELECT notification_template_id, user_id, created_by, payload, targets, status::text AS status"
        " FROM notification_messages ORDER BY created_at, id"
    )


async def test_build_does_not_touch_the_database_and_load_reads_monitors(db: Database) -> None:
    ident = await seed_agent(db)
    await add_memory_monitor(db, ident.agent_id, enabled=False)
    await add_volume_monitor(db, ident.agent_id, "/home")
    await add_volume_monitor(db, ident.agent_id, "/data", enabled=False)
    svc = resources.build(make_scope(None, ident))  # no database at all: build must not use it
    assert not svc.loaded
    svc.scope = make_scope(db, ident)
    await svc.load()
    resp = await svc.get_configuration(agent_pb2.GetResourcesMonitoringConfigurationRequest())
    assert (resp.config.num_datapoints, resp.config.collection_interval_seconds) == (20, 10)
    assert resp.HasField("memory") and resp.memory.enabled is False
    assert [(v.path, v.enabled) for v in resp.volumes] == [("/data", False), ("/home", True)]


async def test_configuration_without_monitors_still_has_config(db: Database) -> None:
    ident = await seed_agent(db)
    svc = resources.build(make_scope(db, ident))
    await svc.load()
    resp = await svc.get_configuration(agent_pb2.GetResourcesMonitoringConfigurationRequest())
    assert resp.HasField("config")
    assert (resp.config.num_datapoints, resp.config.collection_interval_seconds) == (20, 10)
    assert not resp.HasField("memory")
    assert list(resp.volumes) == []


async def test_handlers_cover_both_rpcs(db: Database) -> None:
    svc = resources.build(make_scope(db, await seed_agent(db)))
    assert set(svc.handlers()) == {
        "/coder.agent.v2.Agent/GetResourcesMonitoringConfiguration",
        "/coder.agent.v2.Agent/PushResourcesMonitoringUsage",
    }


async def memory_row(db: Database, agent: uuid.UUID) -> dict[str, object]:
    row = await db.fetchone(
        "SELECT state::text AS state, updated_at, debounced_until"
        " FROM workspace_agent_memory_resource_monitors WHERE agent_id = %s",
        [agent],
    )
    assert row is not None
    return row


async def test_memory_alert_notifies_once_then_debounces(db: Database) -> None:
    ident = await seed_agent(db)
    await add_memory_monitor(db, ident.agent_id, threshold=80)
    now = FakeNow()
    svc = resources.build(make_scope(db, ident, now=now))
    await svc.load()

    high, low = (900, 1000), (100, 1000)
    await svc.push_usage(push([high] * 20))
    row = await memory_row(db, ident.agent_id)
    assert row == {"state": "NOK", "updated_at": T0, "debounced_until": T0 + DEBOUNCE}
    [note] = await notifications(db)
    assert note["notification_template_id"] == resources.MEMORY_TEMPLATE_ID
    assert note["user_id"] == ident.owner_id
    assert note["created_by"] == "workspace-monitor-memory"
    assert note["status"] == "pending"
    assert note["targets"] == [ident.workspace_id, ident.owner_id, ident.organization_id]
    payload = note["payload"]
    assert isinstance(payload, dict)
    assert payload["labels"] == {"workspace": ident.workspace_name, "threshold": "80%"}
    assert payload["data"] == {"timestamp": "2026-11-26T12:00:00Z"}

    # Still NOK: written again (updated_at moves), no notification.
    now.advance(seconds=10)
    await svc.push_usage(push([high] * 20))
    row = await memory_row(db, ident.agent_id)
    assert row == {"state": "NOK", "updated_at": now(), "debounced_until": T0 + DEBOUNCE}
    # Recovers, then alerts again inside the 30-minute window: no notification.
    now.advance(minutes=5)
    await svc.push_usage(push([low] * 20))
    assert (await memory_row(db, ident.agent_id))["state"] == "OK"
    now.advance(minutes=5)
    await svc.push_usage(push([high] * 20))
    assert (await memory_row(db, ident.agent_id))["state"] == "NOK"
    assert len(await notifications(db)) == 1
    # After the window, OK → NOK notifies again.
    now.advance(minutes=25)
    await svc.push_usage(push([low] * 20))
    await svc.push_usage(push([high] * 20))
    assert len(await notifications(db)) == 2
    assert (await memory_row(db, ident.agent_id))["debounced_until"] == now() + DEBOUNCE


async def test_memory_unknown_datapoints_keep_alert(db: Database) -> None:
    ident = await seed_agent(db)
    await add_memory_monitor(db, ident.agent_id)
    svc = resources.build(make_scope(db, ident))
    await svc.load()
    await svc.push_usage(push([(950, 1000)] * 20))
    await svc.push_usage(push([(10, 1000)] * 19 + [None]))  # one unknown: cannot clear the alert
    assert (await memory_row(db, ident.agent_id))["state"] == "NOK"
    assert svc.memory is not None and svc.memory.state == "NOK"


async def test_disabled_or_missing_memory_monitor_is_not_touched(db: Database) -> None:
    ident = await seed_agent(db)
    await add_memory_monitor(db, ident.agent_id, enabled=False)
    svc = resources.build(make_scope(db, ident))
    await svc.load()
    await svc.push_usage(push([(999, 1000)] * 20))
    row = await memory_row(db, ident.agent_id)
    assert row["state"] == "OK" and row["updated_at"] != T0
    assert await notifications(db) == []

    other = await seed_agent(db)
    svc2 = resources.build(make_scope(db, other))
    await svc2.load()
    await svc2.push_usage(push([(999, 1000)] * 20))  # no monitor rows at all: nothing to do
    assert await notifications(db) == []


async def volume_states(db: Database, agent: uuid.UUID) -> dict[str, tuple[str, dt.datetime]]:
    rows = await db.fetchall(
        "SELECT path, state::text AS state, updated_at FROM workspace_agent_volume_resource_monitors"
        " WHERE agent_id = %s",
        [agent],
    )
    return {r["path"]: (r["state"], r["updated_at"]) for r in rows}


async def test_volumes_one_notification_for_all_alerting_volumes(db: Database) -> None:
    ident = await seed_agent(db)
    for path in ("/home", "/data", "/tmp"):
        await add_volume_monitor(db, ident.agent_id, path, threshold=90)
    await add_volume_monitor(db, ident.agent_id, "/off", enabled=False)
    now = FakeNow()
    svc = resources.build(make_scope(db, ident, now=now))
    await svc.load()
    full, empty = (95, 100), (5, 100)
    await svc.push_usage(
        push(
            [None] * 20,
            {"/home": [full] * 20, "/data": [full] * 20, "/tmp": [empty] * 20, "/off": [full] * 20},
        )
    )
    states = await volume_states(db, ident.agent_id)
    assert states["/home"] == ("NOK", T0)
    assert states["/data"] == ("NOK", T0)
    assert states["/tmp"] == ("OK", T0)
    assert states["/off"][0] == "OK" and states["/off"][1] != T0  # disabled: never written
    [note] = await notifications(db)
    assert note["notification_template_id"] == resources.VOLUME_TEMPLATE_ID
    assert note["created_by"] == "workspace-monitor-volumes"
    payload = note["payload"]
    assert isinstance(payload, dict)
    assert payload["labels"] == {"workspace": ident.workspace_name}
    assert payload["data"] == {
        "volumes": [{"path": "/data", "threshold": "90%"}, {"path": "/home", "threshold": "90%"}],
        "timestamp": "2026-11-26T12:00:00Z",
    }
    # A volume missing from every datapoint is UNKNOWN throughout: state kept, row still written.
    now.advance(minutes=1)
    await svc.push_usage(push([None] * 20, {"/tmp": [empty] * 20}))
    states = await volume_states(db, ident.agent_id)
    assert states["/home"] == ("NOK", now())
    assert states["/tmp"] == ("OK", now())
    assert len(await notifications(db)) == 1


async def test_memory_and_volume_alerts_in_one_push(db: Database) -> None:
    ident = await seed_agent(db)
    await add_memory_monitor(db, ident.agent_id)
    await add_volume_monitor(db, ident.agent_id, "/home")
    svc = resources.build(make_scope(db, ident))
    await svc.load()
    await svc.push_usage(push([(99, 100)] * 20, {"/home": [(99, 100)] * 20}))
    notes = await notifications(db)
    assert sorted(str(n["created_by"]) for n in notes) == [
        "workspace-monitor-memory",
        "workspace-monitor-volumes",
    ]
    assert all(json.dumps(n["payload"]) for n in notes)


async def test_errors_are_joined_and_other_monitors_still_processed(db: Database) -> None:
    """The memory notification fails (its table is gone): the push answers an error naming the memory
    monitor, and the volume monitor was still evaluated and written."""
    ident = await seed_agent(db)
    await add_memory_monitor(db, ident.agent_id)
    await add_volume_monitor(db, ident.agent_id, "/home")
    svc = resources.build(make_scope(db, ident))
    await svc.load()
    await db.execute("ALTER TABLE notification_messages RENAME TO notification_messages_away")
    with pytest.raises(RpcError) as err:
        await svc.push_usage(push([(99, 100)] * 20, {"/home": [(99, 100)] * 20}))
    assert "monitor memory: " in err.value.message
    assert "monitor volumes: " in err.value.message
    assert (await memory_row(db, ident.agent_id))["state"] == "NOK"
    assert (await volume_states(db, ident.agent_id))["/home"][0] == "NOK"


async def test_end_to_end_through_an_agent_connection(db: Database, nursery: trio.Nursery) -> None:
    """The monitors are loaded when the connection starts; both RPCs over yamux + DRPC."""
    ident, token = await seed(
        db,
        memory_monitor={"enabled": True, "threshold": 80},
        volume_monitors=[{"path": "/home/coder", "enabled": True, "threshold": 90}],
    )
    agent = await nursery.start(serve_agent, db, token)
    config = await agent.client.agent.GetResourcesMonitoringConfiguration(
        agent_pb2.GetResourcesMonitoringConfigurationRequest()
    )
    assert (config.config.num_datapoints, config.config.collection_interval_seconds) == (20, 10)
    assert config.memory.enabled is True
    assert [(v.path, v.enabled) for v in config.volumes] == [("/home/coder", True)]
    await agent.client.agent.PushResourcesMonitoringUsage(
        push([(90, 100)] * 20, {"/home/coder": [(10, 100)] * 20})
    )
    assert (await memory_row(db, ident.agent_id))["state"] == "NOK"
    assert [n["created_by"] for n in await notifications(db)] == ["workspace-monitor-memory"]
    await agent.disconnect()
