"""UpdateStats (spec §7.4, §9.2, §9.3): report interval, stats rows, metrics, activity bump with the
template/deadline/autostart rules, last_used_at, the stats_update event, prebuild exclusions."""

from __future__ import annotations

import datetime as dt
import functools
import json
import uuid
from typing import Any

import attrs
import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing

import agentd.testing
from agentd.batchers.activity import ActivityBumper
from agentd.batchers.last_used import LastUsedTracker
from agentd.batchers.stats import StatsBatcher
from agentd.components import Components
from agentd.connection import start_components
from agentd.daemon import build_components
from agentd.drpc.errors import RpcError
from agentd.metrics import AgentMetrics
from agentd.model import PREBUILDS_USER_ID, AgentIdentity
from agentd.proto import agent_pb2
from agentd.services.base import Settings
from agentd.services.events import Events
from agentd.services.stats import (
    DEFAULT_REPORT_INTERVAL,
    ScheduleError,
    StatsService,
    WeeklySchedule,
    build,
    next_autostart,
)
from agentd.store import Database, PubSub
from agentd.store.metadata import metadata_rows
from agentd.testing import serve_agent
from tests.services.audit_support import T0, FakeNow, make_scope, seed
from tests.services.core_support import round_trips
from tests.services.test_metadata import seed_with_metadata

Metric = agent_pb2.Stats.Metric
HOUR_NS = 3600 * 10**9
ZERO = dt.datetime(1, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Autojump only after real idleness, so database round trips never look like idle time."""
    return agentd.testing.virtual_clock(0.2)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def publish(self, channel: str, payload: str | bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.sent.append((channel, json.loads(payload)))


@attrs.define
class Parts:
    svc: StatsService
    batcher: StatsBatcher
    last_used: LastUsedTracker
    metrics: AgentMetrics
    published: Recorder


def parts(
    db: Database, ident: AgentIdentity, *, cached: bool = True, settings: Settings | None = None
) -> Parts:
    components = Components(
        stats_batcher=StatsBatcher(db), last_used=LastUsedTracker(db, now=FakeNow()), metrics=AgentMetrics()
    )
    rec = Recorder()
    scope = make_scope(db, ident, components=components, cached=cached)
    scope = attrs.evolve(scope, events=Events(rec), settings=settings or Settings())
    return Parts(build(scope), components.stats_batcher, components.last_used, components.metrics, rec)


def stats(connections: int = 1, **kw: Any) -> agent_pb2.UpdateStatsRequest:
    s = agent_pb2.Stats(
        connections_by_proto={"ssh": connections},
        connection_count=connections,
        connection_median_latency_ms=12.5,
        rx_packets=1,
        rx_bytes=100,
        tx_packets=2,
        tx_bytes=200,
        session_count_vscode=1,
        session_count_jetbrains=2,
        session_count_reconnecting_pty=3,
        session_count_ssh=4,
        **kw,
    )
    return agent_pb2.UpdateStatsRequest(stats=s)


async def flush(p: Parts) -> None:
    """Start and stop the batchers: their shutdown flush writes what they hold."""
    async with trio.open_nursery() as nursery:
        await nursery.start(p.batcher.run)
        await nursery.start(p.last_used.run)
        nursery.cancel_scope.cancel()


async def stats_rows(db: Database) -> list[dict[str, Any]]:
    return await db.fetchall("SELECT * FROM workspace_agent_stats ORDER BY created_at")


async def deadline(db: Database, ident: AgentIdentity) -> dt.datetime:
    value = await db.fetchval("SELECT deadline FROM workspace_builds WHERE id = %s", [ident.build_id])
    assert isinstance(value, dt.datetime)
    return value


async def schedule_rules(
    db: Database,
    ident: AgentIdentity,
    *,
    activity_bump: int = HOUR_NS,
    deadline: dt.datetime | None = T0 + dt.timedelta(minutes=10),
    max_deadline: dt.datetime = ZERO,
    ttl: int | None = 8 * HOUR_NS,
    default_ttl: int = 2 * HOUR_NS,
    allow_user_autostop: bool = True,
    autostart: str | None = None,
) -> None:
    await db.execute(
        "UPDATE templates SET activity_bump = %s, default_ttl = %s, allow_user_autostop = %s WHERE id = %s",
        [activity_bump, default_ttl, allow_user_autostop, ident.template_id],
    )
    await db.execute(
        "UPDATE workspaces SET ttl = %s, autostart_schedule = %s WHERE id = %s",
        [ttl, autostart, ident.workspace_id],
    )
    await db.execute(
        "UPDATE workspace_builds SET deadline = %s, max_deadline = %s WHERE id = %s",
        [deadline or ZERO, max_deadline, ident.build_id],
    )


# ---- report interval, rows, metrics ------------------------------------------------------------------


async def test_report_interval_is_always_sent(db: Database) -> None:
    ident, _ = await seed(db)
    p = parts(db, ident, settings=Settings(stats_report_interval=dt.timedelta(seconds=30)))
    response = await p.svc.update_stats(agent_pb2.UpdateStatsRequest())  # no stats: the interval only
    assert response.report_interval.ToTimedelta() == dt.timedelta(seconds=30)
    assert p.batcher.pending == 0 and p.last_used.pending == 0 and p.published.sent == []
    # A zero setting still sends a positive interval (coderd's 5 min default), with or without stats.
    p = parts(db, ident, settings=Settings(stats_report_interval=dt.timedelta(0)))
    response = await p.svc.update_stats(agent_pb2.UpdateStatsRequest())
    assert response.HasField("report_interval")
    assert response.report_interval.ToTimedelta() == DEFAULT_REPORT_INTERVAL == dt.timedelta(minutes=5)
    assert (await p.svc.update_stats(stats())).report_interval.ToTimedelta() == DEFAULT_REPORT_INTERVAL


async def test_report_becomes_a_stats_row(db: Database) -> None:
    ident, _ = await seed(db)
    p = parts(db, ident)
    await p.svc.update_stats(stats(3))
    await flush(p)
    [row] = await stats_rows(db)
    row.pop("id")
    assert row == {
        "created_at": T0,
        "user_id": ident.owner_id,
        "agent_id": ident.agent_id,
        "workspace_id": ident.workspace_id,
        "template_id": ident.template_id,
        "connections_by_proto": {"ssh": 3},
        "connection_count": 3,
        "rx_packets": 1,
        "rx_bytes": 100,
        "tx_packets": 2,
        "tx_bytes": 200,
        "connection_median_latency_ms": 12.5,
        "session_count_vscode": 1,
        "session_count_jetbrains": 2,
        "session_count_reconnecting_pty": 3,
        "session_count_ssh": 4,
        "usage": False,
    }


async def test_workspace_usage_experiment_zeroes_session_counts(db: Database) -> None:
    ident, _ = await seed(db)
    p = parts(db, ident, settings=Settings(experiments=frozenset({"workspace-usage"})))
    request = stats(2)
    await p.svc.update_stats(request)
    await flush(p)
    [row] = await stats_rows(db)
    assert [row[f"session_count_{k}"] for k in ("vscode", "jetbrains", "reconnecting_pty", "ssh")] == [0] * 4
    assert (row["connection_count"], row["rx_bytes"]) == (2, 100)
    assert request.stats.session_count_ssh == 4  # the caller's message is left alone


async def test_metrics_are_recorded_with_the_agents_identity(db: Database) -> None:
    ident, _ = await seed(db)
    p = parts(db, ident)
    metric = Metric(name="agent_scripts_executed_total", type=Metric.COUNTER, value=2)
    metric.labels.add(name="success", value="true")
    await p.svc.update_stats(stats(0, metrics=[metric, Metric(name="x", type=Metric.TYPE_UNSPECIFIED)]))
    [(key, value)] = p.metrics.samples().items()
    assert value == 2
    assert key == (
        "agent_scripts_executed_total",
        (
            ("username", ident.owner_username),
            ("workspace_name", ident.workspace_name),
            ("agent_name", ident.agent_name),
            ("template_name", "tpl"),
            ("success", "true"),
        ),
    )
    assert p.metrics.invalid_metrics == 1


async def test_no_connections_stops_after_the_row_and_metrics(db: Database) -> None:
    ident, _ = await seed(db)
    await schedule_rules(db, ident)
    p = parts(db, ident)
    await p.svc.update_stats(stats(0, metrics=[Metric(name="up", type=Metric.GAUGE, value=1)]))
    assert p.batcher.pending == 1 and p.metrics.series_count == 1
    assert p.last_used.pending == 0 and p.published.sent == []
    assert await deadline(db, ident) == T0 + dt.timedelta(minutes=10)  # no bump


async def test_connections_mark_the_workspace_used_and_publish_stats_update(db: Database) -> None:
    ident, _ = await seed(db)
    p = parts(db, ident)
    await p.svc.update_stats(stats(1))
    assert p.published.sent == [
        (
            f"workspace_owner:{ident.owner_id}",
            {"kind": "stats_update", "workspace_id": str(ident.workspace_id)},
        )
    ]
    await flush(p)
    assert await db.fetchval("SELECT last_used_at FROM workspaces WHERE id = %s", [ident.workspace_id]) == T0


async def test_stats_update_reaches_pubsub_subscribers(db: Database, clock: trio.testing.MockClock) -> None:
    ident, _ = await seed(db)
    pubsub = PubSub(db)
    scope = attrs.evolve(make_scope(db, ident), events=Events(pubsub))
    svc = build(scope)
    async with trio.open_nursery() as nursery:
        await nursery.start(pubsub.run)
        async with pubsub.subscribe(f"workspace_owner:{ident.owner_id}") as sub:
            await svc.update_stats(stats(1))
            payload = await sub.__anext__()
        nursery.cancel_scope.cancel()
    assert isinstance(payload, str)
    assert json.loads(payload) == {"kind": "stats_update", "workspace_id": str(ident.workspace_id)}


async def test_without_cache_the_workspace_is_read_from_the_database(db: Database) -> None:
    ident, _ = await seed(db)
    p = parts(db, ident, cached=False)
    await p.svc.update_stats(stats(1))
    await flush(p)
    [row] = await stats_rows(db)
    assert (row["workspace_id"], row["user_id"], row["template_id"]) == (
        ident.workspace_id,
        ident.owner_id,
        ident.template_id,
    )


async def test_agent_without_workspace_is_an_error(db: Database) -> None:
    ident, _ = await seed(db)
    ghost = attrs.evolve(ident, agent_id=uuid.uuid4())
    p = parts(db, ghost, cached=False)
    with pytest.raises(RpcError) as err:
        await p.svc.update_stats(stats(1))
    assert err.value.message == f'get workspace by agent ID "{ghost.agent_id}": sql: no rows in result set'
    # The interval-only call never needs the workspace.
    assert (await p.svc.update_stats(agent_pb2.UpdateStatsRequest())).report_interval.seconds == 30


# ---- activity bump (§9.3) ------------------------------------------------------------------------------


async def test_bump_extends_the_deadline_by_the_templates_activity_bump(db: Database) -> None:
    ident, _ = await seed(db)
    await schedule_rules(db, ident)
    await parts(db, ident).svc.update_stats(stats(1))
    assert await deadline(db, ident) == T0 + dt.timedelta(hours=1)


async def test_bump_is_throttled_until_5_percent_of_the_interval_elapsed(db: Database) -> None:
    ident, _ = await seed(db)
    await schedule_rules(db, ident, deadline=T0 + dt.timedelta(minutes=58))  # 58 > 0.95 h: no bump
    svc = parts(db, ident).svc
    await svc.update_stats(stats(1))
    assert await deadline(db, ident) == T0 + dt.timedelta(minutes=58)
    await schedule_rules(db, ident, deadline=T0 + dt.timedelta(minutes=56))  # 56 < 57: bump
    await svc.update_stats(stats(1))
    assert await deadline(db, ident) == T0 + dt.timedelta(hours=1)


async def test_bump_is_capped_by_max_deadline(db: Database) -> None:
    ident, _ = await seed(db)
    await schedule_rules(db, ident, max_deadline=T0 + dt.timedelta(minutes=30))
    await parts(db, ident).svc.update_stats(stats(1))
    assert await deadline(db, ident) == T0 + dt.timedelta(minutes=30)


async def test_bump_does_not_apply(db: Database) -> None:
    """Each rule of §9.3 that prevents a bump, one workspace per rule (one database for all)."""

    async def activity_bump_zero(ident: AgentIdentity) -> None:
        await schedule_rules(db, ident, activity_bump=0)

    async def no_deadline(ident: AgentIdentity) -> None:
        await schedule_rules(db, ident, deadline=None)

    async def stop_transition(ident: AgentIdentity) -> None:
        await schedule_rules(db, ident)
        await db.execute("UPDATE workspace_builds SET transition = 'stop' WHERE id = %s", [ident.build_id])

    async def job_not_completed(ident: AgentIdentity) -> None:
        await schedule_rules(db, ident)
        await db.execute(
            "UPDATE provisioner_jobs SET completed_at = NULL"
            " WHERE id = (SELECT job_id FROM workspace_builds WHERE id = %s)",
            [ident.build_id],
        )

    async def autostart_branch_without_ttl(ident: AgentIdentity) -> None:
        # The autostart branch needs the workspace TTL; none set → no bump (as coderd's SQL).
        await schedule_rules(db, ident, ttl=None, autostart="CRON_TZ=UTC 30 12 * * *")

    for case in (
        activity_bump_zero,
        no_deadline,
        stop_transition,
        job_not_completed,
        autostart_branch_without_ttl,
    ):
        ident, _ = await seed(db)
        await case(ident)
        before = await deadline(db, ident)
        await parts(db, ident, cached=False).svc.update_stats(stats(1))
        assert await deadline(db, ident) == before, case.__name__


async def test_a_failing_bump_is_logged_not_the_agents_error(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    ident, _ = await seed(db)
    p = parts(db, ident)
    await db.execute("ALTER TABLE workspace_builds RENAME TO wb_gone")
    try:
        response = await p.svc.update_stats(stats(1))
    finally:
        await db.execute("ALTER TABLE wb_gone RENAME TO workspace_builds")
    assert response.report_interval.seconds == 30
    assert p.last_used.pending == 1 and len(p.published.sent) == 1
    assert any("activity bump of workspace" in r.getMessage() for r in caplog.records)


async def test_bump_past_next_autostart_uses_autostart_plus_ttl(db: Database) -> None:
    ident, _ = await seed(db)  # T0 is Thursday 12:00 UTC; next autostart 12:30, within the 1 h bump
    await schedule_rules(db, ident, autostart="CRON_TZ=UTC 30 12 * * *")
    await parts(db, ident, cached=False).svc.update_stats(stats(1))  # the schedule comes from the row
    assert await deadline(db, ident) == T0 + dt.timedelta(minutes=30, hours=8)


async def test_autostart_branch_uses_template_ttl_when_users_cannot_set_autostop(db: Database) -> None:
    ident, _ = await seed(db)
    await schedule_rules(db, ident, autostart="CRON_TZ=Europe/Berlin 30 13 * * 4", allow_user_autostop=False)
    await parts(db, ident, cached=False).svc.update_stats(stats(1))  # 13:30 Berlin (UTC+1) = 12:30 UTC
    assert await deadline(db, ident) == T0 + dt.timedelta(minutes=30, hours=2)


async def test_far_autostart_and_unparsable_schedules_use_the_activity_bump(db: Database) -> None:
    for schedule in ("CRON_TZ=UTC 0 9 * * 1", "every day at noon"):
        ident, _ = await seed(db)
        await schedule_rules(db, ident, autostart=schedule)
        await parts(db, ident, cached=False).svc.update_stats(stats(1))
        assert await deadline(db, ident) == T0 + dt.timedelta(hours=1)


async def test_prebuilds_get_no_bump_but_are_marked_used(db: Database) -> None:
    ident, _ = await seed(db)
    await schedule_rules(db, ident)
    await db.execute(
        "UPDATE workspaces SET owner_id = %s WHERE id = %s", [PREBUILDS_USER_ID, ident.workspace_id]
    )
    p = parts(db, ident, cached=False)  # prebuilds have no cached identity
    await p.svc.update_stats(stats(1))
    assert await deadline(db, ident) == T0 + dt.timedelta(minutes=10)
    assert p.last_used.pending == 1
    assert [c for c, _ in p.published.sent] == [f"workspace_owner:{PREBUILDS_USER_ID}"]
    await flush(p)
    [row] = await stats_rows(db)
    assert row["user_id"] == PREBUILDS_USER_ID


# ---- autostart schedules --------------------------------------------------------------------------------


def test_weekly_schedule_next_after() -> None:
    thu_noon = T0
    assert T0.weekday() == 3
    s = WeeklySchedule.parse("CRON_TZ=America/Chicago 30 9 * * 1-5")
    assert s.next_after(thu_noon) == dt.datetime(2026, 11, 26, 15, 30, tzinfo=dt.UTC)  # 09:30 CST
    assert s.next_after(dt.datetime(2026, 11, 27, 15, 30, tzinfo=dt.UTC)) == dt.datetime(
        2026, 11, 30, 15, 30, tzinfo=dt.UTC
    )  # strictly after: Friday's run is now, so Monday's
    assert WeeklySchedule.parse("0 8 * * SUN,sat").next_after(thu_noon) == dt.datetime(
        2026, 11, 28, 8, 0, tzinfo=dt.UTC
    )
    assert WeeklySchedule.parse("*/15 * * * 7").next_after(thu_noon).weekday() == 6
    assert WeeklySchedule.parse("5,10 11 * * *").next_after(thu_noon) == dt.datetime(
        2026, 11, 27, 11, 5, tzinfo=dt.UTC
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0 9 * *",
        "0 9 1 * *",
        "0 9 * 1 *",
        "60 9 * * *",
        "0 24 * * *",
        "0 9 * * 8",
        "0 9 * * 5-1",
        "*/0 9 * * *",
        "CRON_TZ=Mars/Olympus 0 9 * * *",
        "a 9 * * *",
    ],
)
def test_unparsable_schedules(text: str) -> None:
    with pytest.raises(ScheduleError):
        WeeklySchedule.parse(text)
    assert next_autostart(text, T0) is None


def test_no_schedule_means_no_autostart() -> None:
    assert next_autostart(None, T0) is None and next_autostart("", T0) is None


# ---- end to end ------------------------------------------------------------------------------------------


async def test_end_to_end_through_an_agent_connection(db: Database, clock: trio.testing.MockClock) -> None:
    """Wired as the daemon wires them: components started by start_components, flushed by cancelling."""
    [(ident, token)] = await seed_with_metadata(db, ["cpu"])
    await db.execute(
        "UPDATE workspace_builds SET deadline = now() + interval '5 minutes' WHERE id = %s", [ident.build_id]
    )
    pubsub = PubSub(db)
    components = daemon_components(db, pubsub)
    settings = Settings(stats_report_interval=dt.timedelta(seconds=30))
    async with trio.open_nursery() as daemon:
        await start_components(components, daemon)
        async with trio.open_nursery() as nursery:
            agent = await nursery.start(
                functools.partial(
                    serve_agent,
                    db,
                    token,
                    services=("stats", "metadata"),
                    components=components,
                    settings=settings,
                    events=Events(pubsub),
                )
            )
            first = await agent.client.agent.UpdateStats(agent_pb2.UpdateStatsRequest())
            assert first.report_interval.ToTimedelta() == dt.timedelta(seconds=30)
            gauge = Metric(name="agent_load", type=Metric.GAUGE, value=0.5)
            await agent.client.agent.UpdateStats(stats(2, metrics=[gauge]))
            await agent.client.agent.BatchUpdateMetadata(
                agent_pb2.BatchUpdateMetadataRequest(
                    metadata=[agent_pb2.Metadata(key="cpu", result={"value": "12%"})]
                )
            )
            await trio.sleep(2)  # the stats batcher's 1 s flush
            assert len(await stats_rows(db)) == 1
            assert components.activity_bumper.bumps == 1  # through the daemon's group commit
            await agent.disconnect()
        daemon.cancel_scope.cancel()  # shutdown flushes last_used_at and the metadata batch
    row = await db.fetchone(
        "SELECT w.last_used_at, b.deadline FROM workspaces w JOIN workspace_builds b ON b.workspace_id = w.id"
        " WHERE w.id = %s",
        [ident.workspace_id],
    )
    assert row is not None and row["last_used_at"] > ZERO
    assert row["deadline"] - row["last_used_at"] > dt.timedelta(minutes=50)  # bumped by the default 1 h
    assert (await metadata_rows(db, ident.agent_id))["cpu"].value == "12%"
    text = components.metrics.render()
    assert f'agent_name="{ident.agent_name}"' in text
    assert "agentd_metadata_updates_dropped_total 0.0" in text.splitlines()


def daemon_components(db: Database, pubsub: PubSub) -> Components:
    """Exactly the components `agentd serve` runs."""
    return build_components(db, pubsub, Settings())


_CRON_TOKENS = [
    "*",
    "*",
    "*",
    "0",
    "7",
    "59",
    "23",
    "1-5",
    "*/2",
    "5/3",
    "MON",
    "sun-sat",
    "x",
    "2-1",
    "²",
    "1,2",
]


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
    st.one_of(
        st.text(max_size=40),
        st.lists(st.sampled_from(_CRON_TOKENS), min_size=5, max_size=5).map(" ".join),
        st.lists(st.sampled_from(_CRON_TOKENS), min_size=5, max_size=5).map(
            lambda fields: "CRON_TZ=Asia/Kolkata " + " ".join(fields)
        ),
    )
)
def test_any_schedule_text_parses_or_is_a_schedule_error(text: str) -> None:
    try:
        s = WeeklySchedule.parse(text)
    except ScheduleError:
        assert next_autostart(text, T0) is None
        return
    assert s.next_after(T0) > T0


@pytest.mark.parametrize("group_commit", [False, True])
async def test_with_postgres_pubsub_bump_and_event_are_one_statement(
    db: Database, clock: trio.testing.MockClock, group_commit: bool
) -> None:
    """The one-statement path keeps the bump rules (throttle included) and the event — on its own,
    and through the daemon's group commit (agentd.batchers.activity)."""
    ident, _ = await seed(db)
    pubsub = PubSub(db)
    p = parts(db, ident)
    bumper = ActivityBumper(db) if group_commit else None
    svc = attrs.evolve(p.svc, events=Events(pubsub), activity_bumper=bumper)
    async with trio.open_nursery() as nursery:
        await nursery.start(pubsub.run)
        async with pubsub.subscribe(f"workspace_owner:{ident.owner_id}") as sub:
            await schedule_rules(db, ident, deadline=T0 + dt.timedelta(minutes=58))  # throttled
            with round_trips() as trips:
                await svc.update_stats(stats(1))
            assert trips == [1]
            assert await deadline(db, ident) == T0 + dt.timedelta(minutes=58)
            await schedule_rules(db, ident, deadline=T0 + dt.timedelta(minutes=56))  # bumped
            await svc.update_stats(stats(1))
            assert await deadline(db, ident) == T0 + dt.timedelta(hours=1)
            payloads = [await sub.__anext__(), await sub.__anext__()]
        nursery.cancel_scope.cancel()
    event = {"kind": "stats_update", "workspace_id": str(ident.workspace_id)}
    assert [json.loads(x) for x in payloads if isinstance(x, str)] == [event, event]
    assert p.last_used.pending == 1
    if bumper is not None:
        assert (bumper.statements, bumper.bumps) == (2, 2)
