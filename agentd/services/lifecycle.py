"""UpdateLifecycle and UpdateStartup (spec §7.5, §7.6): how a workspace becomes "ready".

UpdateLifecycle records a state change with the started_at / ready_at rules and publishes
``agt_lifecycle_update``; there is no transition validation (any state may follow any other).
UpdateStartup records the agent's version (Go semver with a leading ``v``), expanded directory,
subsystems and the API version negotiated at the upgrade.

The first time per connection a top-level agent reaches a terminal startup state (ready, start_timeout,
start_error), and once every agent of its build has, the end-to-end build duration (last ready_at -
build creation) is observed in ``coderd_template_workspace_build_duration_seconds`` — a process-wide
`BuildDurationHistogram` the daemon puts in ``components.build_durations`` and renders on /metrics.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterable, Mapping

import attrs
from google.protobuf import timestamp_pb2
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from prometheus_client import Histogram
from prometheus_client.metrics_core import Metric

from agentd.drpc.errors import RpcError
from agentd.drpc.registry import Handler
from agentd.metrics import exposition
from agentd.proto import agent_pb2
from agentd.services import events
from agentd.services.base import AGENT, ConnectionScope
from agentd.services.logs import go_quote
from agentd.store import lifecycle as store
from agentd.store.errors import StoreError

__all__ = [
    "BUILD_DURATION_BUCKETS",
    "BUILD_DURATION_METRIC",
    "LIFECYCLE_STATES",
    "SUBSYSTEMS",
    "BuildDurationHistogram",
    "LifecycleService",
    "build",
    "is_go_semver",
    "lifecycle_rules",
    "subsystem_names",
]

log = logging.getLogger("agentd.services.lifecycle")

UPDATE_LIFECYCLE = AGENT + "UpdateLifecycle"
UPDATE_STARTUP = AGENT + "UpdateStartup"

LIFECYCLE_STATES: Mapping[int, str] = {
    agent_pb2.Lifecycle.CREATED: "created",
    agent_pb2.Lifecycle.STARTING: "starting",
    agent_pb2.Lifecycle.START_TIMEOUT: "start_timeout",
    agent_pb2.Lifecycle.START_ERROR: "start_error",
    agent_pb2.Lifecycle.READY: "ready",
    agent_pb2.Lifecycle.SHUTTING_DOWN: "shutting_down",
    agent_pb2.Lifecycle.SHUTDOWN_TIMEOUT: "shutdown_timeout",
    agent_pb2.Lifecycle.SHUTDOWN_ERROR: "shutdown_error",
    agent_pb2.Lifecycle.OFF: "off",
}

SUBSYSTEMS: Mapping[int, str] = {
    agent_pb2.Startup.ENVBOX: "envbox",
    agent_pb2.Startup.ENVBUILDER: "envbuilder",
    agent_pb2.Startup.EXECTRACE: "exectrace",
}

#: Go's zero time (0001-01-01T00:00:00Z) as protobuf Timestamp seconds.
_GO_ZERO_SECONDS = -62135596800
#: Range a Timestamp must stay in to be a datetime (0001-01-01 … 9999-12-31).
_MAX_SECONDS = 253402300799

_TERMINAL_START = frozenset({"ready", "start_timeout", "start_error"})

# golang.org/x/mod/semver: v, MAJOR[.MINOR[.PATCH[-PRERELEASE][+BUILD]]], no leading zeros in numbers
# (nor in numeric prerelease identifiers); pre-release and build only after a full MAJOR.MINOR.PATCH.
_NUM = r"(?:0|[1-9][0-9]*)"
_PRE_IDENT = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
_BUILD_IDENT = r"[0-9A-Za-z-]+"
_GO_SEMVER = re.compile(
    rf"v{_NUM}(?:\.{_NUM}(?:\.{_NUM}(?:-{_PRE_IDENT}(?:\.{_PRE_IDENT})*)?"
    rf"(?:\+{_BUILD_IDENT}(?:\.{_BUILD_IDENT})*)?)?)?"
)


def is_go_semver(version: str) -> bool:
    """``semver.IsValid`` of golang.org/x/mod (``v1``, ``v1.2`` and ``v1.2.3-rc.1+build`` are valid)."""
    return _GO_SEMVER.fullmatch(version) is not None


def _enum_text(value: int, enum_type: EnumTypeWrapper) -> str:
    """How Go's ``%q`` prints a protobuf enum: its name, or the number when unknown."""
    try:
        return enum_type.Name(value)
    except ValueError:
        return str(value)


def lifecycle_rules(state: str) -> tuple[store.TimeRule, store.TimeRule]:
    """(started_at rule, ready_at rule) for a new lifecycle state (spec §7.5)."""
    if state == "starting":
        # A restart resets readiness.
        return store.TimeRule.SET, store.TimeRule.CLEAR
    if state in _TERMINAL_START:
        return store.TimeRule.FILL, store.TimeRule.SET
    return store.TimeRule.KEEP, store.TimeRule.KEEP


def subsystem_names(values: list[int]) -> list[str]:
    """Map, de-duplicate and sort the reported subsystems; unknown ones (incl. UNSPECIFIED) are errors."""
    names: set[str] = set()
    for value in values:
        name = SUBSYSTEMS.get(value)
        if name is None:
            raise RpcError(f'invalid agent subsystem "{_enum_text(value, agent_pb2.Startup.Subsystem)}"')
        names.add(name)
    return sorted(names)


def _changed_at(ts: timestamp_pb2.Timestamp) -> dt.datetime:
    if not _GO_ZERO_SECONDS <= ts.seconds <= _MAX_SECONDS or not 0 <= ts.nanos < 1_000_000_000:
        raise RpcError(f"invalid lifecycle.changed_at: timestamp {ts.seconds}s {ts.nanos}ns is out of range")
    return ts.ToDatetime(tzinfo=dt.UTC)


BUILD_DURATION_METRIC = "coderd_template_workspace_build_duration_seconds"
BUILD_DURATION_BUCKETS = (1.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0)
_BUILD_DURATION_LABELS = ("template_name", "organization_name", "transition", "status", "is_prebuild")


@attrs.define(eq=False)
class BuildDurationHistogram:
    """Coder's ``coderd_template_workspace_build_duration_seconds`` (classic buckets), process-wide.

    A prometheus_client Histogram (in no registry: the daemon's /metrics registers this collector
    in its own), labelled by template_name, organization_name, transition, status (worst startup
    state of the build's agents) and is_prebuild. ``render()`` gives the Prometheus text exposition.
    """

    buckets: tuple[float, ...] = BUILD_DURATION_BUCKETS
    _histogram: Histogram = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._histogram = Histogram(
            BUILD_DURATION_METRIC,
            "Duration from workspace build creation to agent ready, by template.",
            _BUILD_DURATION_LABELS,
            buckets=self.buckets,
            registry=None,
        )

    def observe(
        self,
        seconds: float,
        *,
        template_name: str,
        organization_name: str,
        transition: str,
        status: str,
        is_prebuild: bool,
    ) -> None:
        self._histogram.labels(
            template_name, organization_name, transition, status, "true" if is_prebuild else "false"
        ).observe(seconds)

    def collect(self) -> Iterable[Metric]:
        """prometheus_client's Collector protocol."""
        return self._histogram.collect()

    def samples(self) -> dict[tuple[str, ...], tuple[int, float]]:
        """(count, sum) per label tuple, for tests and callers that export elsewhere."""
        counts: dict[tuple[str, ...], int] = {}
        sums: dict[tuple[str, ...], float] = {}
        for family in self.collect():
            for sample in family.samples:
                key = tuple(sample.labels[label] for label in _BUILD_DURATION_LABELS)
                if sample.name.endswith("_count"):
                    counts[key] = int(sample.value)
                elif sample.name.endswith("_sum"):
                    sums[key] = sample.value
        return {key: (n, sums[key]) for key, n in counts.items()}

    def render(self) -> str:
        return exposition(self)


@attrs.define(eq=False)
class LifecycleService:
    """UpdateLifecycle and UpdateStartup for one agent connection."""

    scope: ConnectionScope
    #: The build-duration check runs at most once per connection (spec §7.5).
    build_duration_checked: bool = False

    def handlers(self) -> dict[str, Handler]:
        return {UPDATE_LIFECYCLE: self.update_lifecycle, UPDATE_STARTUP: self.update_startup}

    async def _observe_build_duration(self) -> None:
        histogram = getattr(self.scope.components, "build_durations", None)
        if histogram is None or self.build_duration_checked:
            return
        self.build_duration_checked = True
        try:
            info = await store.get_build_metrics(self.scope.db, self.scope.ident.resource_id)
        except StoreError:
            log.warning("reading build metrics failed agent_id=%s", self.scope.ident.agent_id, exc_info=True)
            return
        if info is None or not info.all_agents_ready or info.last_agent_ready_at is None:
            return
        histogram.observe(
            (info.last_agent_ready_at - info.created_at).total_seconds(),
            template_name=info.template_name,
            organization_name=info.organization_name,
            transition=info.transition,
            status=info.worst_status,
            is_prebuild=info.is_prebuild,
        )

    def _agent_missing(self) -> RpcError:
        return RpcError(
            f'get workspace agent by id "{self.scope.ident.agent_id}": sql: no rows in result set'
        )

    async def update_lifecycle(self, request: agent_pb2.UpdateLifecycleRequest) -> agent_pb2.Lifecycle:
        ident = self.scope.ident
        lifecycle = agent_pb2.Lifecycle()
        lifecycle.CopyFrom(request.lifecycle)
        state = LIFECYCLE_STATES.get(lifecycle.state)
        if state is None:
            text = _enum_text(lifecycle.state, agent_pb2.Lifecycle.State)
            raise RpcError(f'invalid lifecycle.state: unknown lifecycle state "{text}"')

        # Only Go's zero time means "now"; an absent Timestamp is 1970-01-01 and is kept as such.
        if lifecycle.changed_at.seconds == _GO_ZERO_SECONDS and lifecycle.changed_at.nanos == 0:
            changed_at = self.scope.now()
            lifecycle.changed_at.FromDatetime(changed_at)
        else:
            changed_at = _changed_at(lifecycle.changed_at)

        started_rule, ready_rule = lifecycle_rules(state)
        bus = self.scope.events
        # With PostgreSQL's pubsub the update's statement sends the event too (one round trip).
        notice = None
        if bus.in_statement(self.scope.db):
            notice = bus.workspace_notice(
                ident.owner_id, events.AGT_LIFECYCLE_UPDATE, ident.workspace_id, ident.agent_id
            )
        try:
            times = await store.update_lifecycle_state(
                self.scope.db,
                ident.agent_id,
                state,
                changed_at,
                started_rule=started_rule,
                ready_rule=ready_rule,
                notice=notice,
            )
        except StoreError as exc:
            raise RpcError(f"update workspace agent lifecycle state: {exc}") from exc
        if times is None:
            raise self._agent_missing()

        if notice is None:
            try:
                await bus.workspace(
                    ident.owner_id, events.AGT_LIFECYCLE_UPDATE, ident.workspace_id, ident.agent_id
                )
            except StoreError as exc:
                raise RpcError(f"publish workspace update: {exc}") from exc

        if state in _TERMINAL_START and ident.parent_id is None:
            await self._observe_build_duration()
        return lifecycle

    async def update_startup(self, request: agent_pb2.UpdateStartupRequest) -> agent_pb2.Startup:
        ident = self.scope.ident
        api_version = ident.api_version
        if not api_version:
            raise RpcError("internal error; api version unspecified")
        startup = request.startup
        if not is_go_semver(startup.version):
            raise RpcError(f"invalid agent semver version {go_quote(startup.version)}")
        subsystems = subsystem_names(list(startup.subsystems))
        try:
            found = await store.update_startup(
                self.scope.db,
                ident.agent_id,
                version=startup.version,
                expanded_directory=startup.expanded_directory,
                subsystems=subsystems,
                api_version=f"{api_version[0]}.{api_version[1]}",
            )
        except StoreError as exc:
            raise RpcError(f"update workspace agent startup in database: {exc}") from exc
        if not found:
            raise self._agent_missing()
        response = agent_pb2.Startup()
        response.CopyFrom(startup)
        return response


def build(scope: ConnectionScope) -> LifecycleService:
    """The connection's UpdateLifecycle / UpdateStartup service."""
    return LifecycleService(scope=scope)
