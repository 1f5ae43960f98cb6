"""UpdateStats (spec §7.4): the agent's periodic network/session stats.

Each report is queued as a workspace_agent_stats row in the process-wide stats batcher, feeds the
in-memory agent metrics, and — when the agent has connections — bumps the workspace deadline for
activity (§9.3, skipped for prebuilds), marks the workspace used (batched ``last_used_at``) and
publishes ``stats_update`` to the owner's workspace channel. The response always carries the report
interval; the agent's first call has no stats and only learns that interval.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
import zoneinfo
from collections.abc import Mapping
from typing import Protocol

import attrs
import trio

from agentd.clock import Now, utcnow
from agentd.drpc.errors import RpcError
from agentd.drpc.registry import Handler
from agentd.metrics import COUNTER, GAUGE, AgentLabels, AgentMetrics, ReportedMetric
from agentd.model import WorkspaceIdentity
from agentd.proto import agent_pb2
from agentd.services.base import AGENT, ConnectionScope, Settings, WorkspaceCache
from agentd.services.events import STATS_UPDATE, Events
from agentd.store import Database
from agentd.store.activity import Bump, activity_bump_workspace
from agentd.store.errors import StoreError
from agentd.store.stats import AgentStatsRow, workspace_by_agent_id

__all__ = [
    "DEFAULT_REPORT_INTERVAL",
    "StatsService",
    "WeeklySchedule",
    "build",
    "bump_activity",
    "next_autostart",
]

log = logging.getLogger("agentd.services.stats")

#: coderd's fallback when the configured refresh interval is zero (spec §4.2).
DEFAULT_REPORT_INTERVAL = dt.timedelta(minutes=5)
#: The experiment under which the CLI reports sessions itself, so agent session counts are zeroed.
WORKSPACE_USAGE_EXPERIMENT = "workspace-usage"
ACTIVITY_BUMP_TIMEOUT_S = 15.0

_KINDS = {agent_pb2.Stats.Metric.COUNTER: COUNTER, agent_pb2.Stats.Metric.GAUGE: GAUGE}


# ---------------------------------------------------------------------------------------------
# Autostart schedules: coderd's weekly cron form "CRON_TZ=<zone> <minute> <hour> * * <day-of-week>".

_DOW_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}


class ScheduleError(ValueError):
    """The autostart schedule is not a weekly cron expression this parser understands."""


def _field(text: str, low: int, high: int, names: Mapping[str, int] | None = None) -> frozenset[int]:
    def number(token: str) -> int:
        if names is not None and token.lower() in names:
            return names[token.lower()]
        if not (token.isascii() and token.isdigit()):
            raise ScheduleError(f"bad value {token!r}")
        value = int(token)
        if not low <= value <= high:
            raise ScheduleError(f"value {value} out of range {low}-{high}")
        return value

    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not (step_text.isascii() and step_text.isdigit()) or int(step_text) == 0:
                raise ScheduleError(f"bad step {step_text!r}")
            step = int(step_text)
        if base == "*":
            start, end = low, high
        elif "-" in base:
            a, _, b = base.partition("-")
            start, end = number(a), number(b)
            if start > end:
                raise ScheduleError(f"bad range {base!r}")
        else:
            start = number(base)
            end = high if step_text else start
        values.update(range(start, end + 1, step))
    return frozenset(values)


@attrs.frozen
class WeeklySchedule:
    """A parsed weekly schedule: minutes, hours and days of week (0 = Sunday) in ``zone``."""

    zone: dt.tzinfo
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> WeeklySchedule:
        fields = text.split()
        zone: dt.tzinfo = dt.UTC
        if fields and fields[0].startswith(("CRON_TZ=", "TZ=")):
            name = fields.pop(0).partition("=")[2]
            try:
                zone = zoneinfo.ZoneInfo(name)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
                raise ScheduleError(f"unknown time zone {name!r}") from exc
        if len(fields) != 5:
            raise ScheduleError(f"expected 5 fields, got {len(fields)}")
        minute, hour, dom, month, dow = fields
        if dom != "*" or month != "*":
            raise ScheduleError("day-of-month and month must be *")
        days = _field(dow, 0, 7, _DOW_NAMES)
        days = frozenset(0 if d == 7 else d for d in days)
        return cls(zone, _field(minute, 0, 59), _field(hour, 0, 23), days)

    def next_after(self, at: dt.datetime) -> dt.datetime:
        """The first scheduled minute strictly after ``at`` (as cron computes it), in UTC."""
        local = at.astimezone(self.zone)
        for offset in range(8):
            day = local.date() + dt.timedelta(days=offset)
            if (day.weekday() + 1) % 7 not in self.days:
                continue
            for hour in sorted(self.hours):
                for minute in sorted(self.minutes):
                    candidate = dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=self.zone)
                    if candidate > at:
                        return candidate.astimezone(dt.UTC)
        raise ScheduleError("schedule never fires")  # unreachable: every parsed field is non-empty


def next_autostart(schedule: str | None, now: dt.datetime) -> dt.datetime | None:
    """The workspace's next autostart after ``now``, or None (no schedule, or one that does not parse:
    then the bump simply uses the template's activity_bump)."""
    if not schedule:
        return None
    try:
        return WeeklySchedule.parse(schedule).next_after(now)
    except ScheduleError as exc:
        log.warning("autostart schedule %r not understood (%s); bumping without it", schedule, exc)
        return None


async def bump_activity(
    db: Database,
    workspace: WorkspaceIdentity,
    now: dt.datetime,
    *,
    notice: tuple[str, str] | None = None,
    bumper: ActivityBumps | None = None,
) -> None:
    """The activity bump of spec §9.3 for ``workspace`` at ``now`` (UpdateStats; UpdateAppStatus reuses
    it): next autostart from the workspace's schedule, 15 s timeout, failures logged and never raised.
    ``notice``: an event (channel, payload) the bump's statement sends too (one round trip).
    ``bumper``: the process-wide group commit (agentd.batchers.activity), else a statement of its own."""
    autostart = next_autostart(workspace.autostart_schedule, now)
    with trio.move_on_after(ACTIVITY_BUMP_TIMEOUT_S) as scope:
        try:
            if bumper is not None:
                await bumper.bump(Bump(workspace.id, now, autostart), notice)
            else:
                await activity_bump_workspace(
                    db, workspace.id, now=now, next_autostart=autostart, notice=notice
                )
        except (StoreError, TimeoutError):
            log.error("activity bump of workspace %s failed", workspace.id, exc_info=True)
    if scope.cancelled_caught:
        log.error("activity bump of workspace %s timed out", workspace.id)


# ---------------------------------------------------------------------------------------------


class StatsSink(Protocol):
    """agentd.batchers.stats.StatsBatcher"""

    def add(self, row: AgentStatsRow) -> bool: ...


class ActivityBumps(Protocol):
    """agentd.batchers.activity.ActivityBumper"""

    async def bump(self, bump: Bump, notice: tuple[str, str] | None = None) -> bool: ...


class UsageSink(Protocol):
    """agentd.batchers.last_used.LastUsedTracker"""

    def add(self, workspace_id: uuid.UUID) -> None: ...


@attrs.define(eq=False)
class StatsService:
    agent_id: uuid.UUID
    agent_name: str
    db: Database
    events: Events | None
    cache: WorkspaceCache
    settings: Settings
    stats_batcher: StatsSink | None = None
    last_used: UsageSink | None = None
    activity_bumper: ActivityBumps | None = None
    metrics: AgentMetrics | None = None
    now: Now = utcnow

    def handlers(self) -> dict[str, Handler]:
        return {AGENT + "UpdateStats": self.update_stats}

    @property
    def report_interval(self) -> dt.timedelta:
        interval = self.settings.stats_report_interval
        return interval if interval > dt.timedelta(0) else DEFAULT_REPORT_INTERVAL

    async def update_stats(self, request: agent_pb2.UpdateStatsRequest) -> agent_pb2.UpdateStatsResponse:
        response = agent_pb2.UpdateStatsResponse()
        response.report_interval.FromTimedelta(self.report_interval)
        if not request.HasField("stats"):
            await trio.lowlevel.checkpoint()
            return response
        workspace = self.cache.get()
        if workspace is None:
            workspace = await workspace_by_agent_id(self.db, self.agent_id)
            if workspace is None:
                raise RpcError(f'get workspace by agent ID "{self.agent_id}": sql: no rows in result set')
        stats = request.stats
        if WORKSPACE_USAGE_EXPERIMENT in self.settings.experiments:
            stats = agent_pb2.Stats()
            stats.CopyFrom(request.stats)
            stats.session_count_vscode = 0
            stats.session_count_jetbrains = 0
            stats.session_count_reconnecting_pty = 0
            stats.session_count_ssh = 0
        await self._report(self.now(), workspace, stats)
        return response

    async def _report(self, now: dt.datetime, workspace: WorkspaceIdentity, stats: agent_pb2.Stats) -> None:
        """coderd's ReportAgentStats (usage = false)."""
        if self.stats_batcher is not None:
            self.stats_batcher.add(self._row(now, workspace, stats))
        if self.metrics is not None:
            labels = AgentLabels(
                workspace.owner_username, workspace.name, self.agent_name, workspace.template_name
            )
            self.metrics.update(labels, [_reported(m) for m in stats.metrics])
        if stats.connection_count == 0:
            await trio.lowlevel.checkpoint()
            return
        if self.last_used is not None:
            self.last_used.add(workspace.id)
        if not workspace.is_prebuild and self.events is not None and self.events.in_statement(self.db):
            # One round trip: the bump's statement sends stats_update too.
            notice = self.events.workspace_notice(workspace.owner_id, STATS_UPDATE, workspace.id)
            await bump_activity(self.db, workspace, now, notice=notice, bumper=self.activity_bumper)
            return
        if not workspace.is_prebuild:
            await bump_activity(self.db, workspace, now, bumper=self.activity_bumper)
        if self.events is not None:
            try:
                await self.events.workspace(workspace.owner_id, STATS_UPDATE, workspace.id)
            except StoreError:
                log.warning("publish stats_update for workspace %s", workspace.id, exc_info=True)

    def _row(self, now: dt.datetime, workspace: WorkspaceIdentity, stats: agent_pb2.Stats) -> AgentStatsRow:
        return AgentStatsRow(
            id=uuid.uuid4(),
            created_at=now,
            user_id=workspace.owner_id,
            agent_id=self.agent_id,
            workspace_id=workspace.id,
            template_id=workspace.template_id,
            connections_by_proto=dict(stats.connections_by_proto),
            connection_count=stats.connection_count,
            rx_packets=stats.rx_packets,
            rx_bytes=stats.rx_bytes,
            tx_packets=stats.tx_packets,
            tx_bytes=stats.tx_bytes,
            connection_median_latency_ms=stats.connection_median_latency_ms,
            session_count_vscode=stats.session_count_vscode,
            session_count_jetbrains=stats.session_count_jetbrains,
            session_count_reconnecting_pty=stats.session_count_reconnecting_pty,
            session_count_ssh=stats.session_count_ssh,
            usage=False,
        )


def _reported(metric: agent_pb2.Stats.Metric) -> ReportedMetric:
    labels = tuple((label.name, label.value) for label in metric.labels)
    return ReportedMetric(metric.name, _KINDS.get(metric.type, "unspecified"), metric.value, labels)


def build(scope: ConnectionScope) -> StatsService:
    components = scope.components
    return StatsService(
        agent_id=scope.ident.agent_id,
        agent_name=scope.ident.agent_name,
        db=scope.db,
        events=scope.events,
        cache=scope.cache,
        settings=scope.settings,
        stats_batcher=getattr(components, "stats_batcher", None),
        last_used=getattr(components, "last_used", None),
        activity_bumper=getattr(components, "activity_bumper", None),
        metrics=getattr(components, "metrics", None),
        now=scope.now,
    )
